# Set-up and test entry points. `make run` serves a default image; `make test` installs
# everything the tests need (Debian packages, a venv) and runs the whole suite; `make bench`
# runs the side-by-side benchmark (bench/README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian's libnbd tools and python3-libnbd are built for /usr/bin/python3.
export PATH := /usr/bin:/usr/sbin:$(PATH)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

RUN_PACKAGES := python3 python3-venv
# systemd: systemd-socket-activate; systemd-container, debootstrap: the real-systemd harness
TEST_PACKAGES := $(RUN_PACKAGES) python3-libnbd libnbd-bin qemu-utils qemu-system-x86 \
	nbdkit e2fsprogs systemd systemd-container debootstrap openssl
BENCH_PACKAGES := $(RUN_PACKAGES) python3-libnbd libnbd-bin fio qemu-utils nbdkit util-linux

IMAGE ?= $(CURDIR)/var/default.img
IMAGE_SIZE ?= 10G
LISTEN ?= 127.0.0.1:10809
STATE_DIR ?= $(CURDIR)/var/state

.PHONY: run test lint deps-run deps-test venv clean bench deps-bench

run: deps-run venv
	mkdir -p $(dir $(IMAGE))
	[ -e $(IMAGE) ] || truncate -s $(IMAGE_SIZE) $(IMAGE)
	$(VENV)/bin/nbdtrack serve $(IMAGE) --listen $(LISTEN) --state-dir $(STATE_DIR) \
		--bitmap default

test: deps-test venv lint
	$(VENV)/bin/pytest

lint: venv
	$(VENV)/bin/ruff check nbdtrack tests

deps-run:
	@$(MAKE) --no-print-directory _apt PACKAGES="$(RUN_PACKAGES)"

deps-test:
	@$(MAKE) --no-print-directory _apt PACKAGES="$(TEST_PACKAGES)"

# BENCH_ARGS passes options to bench/run.py, e.g. BENCH_ARGS="--rounds 5 --pin same".
BENCH_ARGS ?=
BACKUP_BENCH_ARGS ?=
bench: deps-bench venv
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/backup.py $(BACKUP_BENCH_ARGS)

deps-bench:
	@$(MAKE) --no-print-directory _apt PACKAGES="$(BENCH_PACKAGES)"

# Install only what is missing, with one `apt-get update` first.
_apt:
	@missing=""; for p in $(PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
