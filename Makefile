# Set-up and test entry points. `make run` serves a default image; `make test` installs
# everything the tests need (Debian packages, a venv) and runs the whole suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian's libnbd tools and python3-libnbd are built for /usr/bin/python3.
export PATH := /usr/bin:/usr/sbin:$(PATH)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

RUN_PACKAGES := python3 python3-venv
TEST_PACKAGES := $(RUN_PACKAGES) python3-libnbd libnbd-bin qemu-utils qemu-system-x86 \
	nbdkit e2fsprogs

IMAGE ?= $(CURDIR)/var/default.img
IMAGE_SIZE ?= 10G
LISTEN ?= 127.0.0.1:10809

.PHONY: run test lint deps-run deps-test venv clean

run: deps-run venv
	mkdir -p $(dir $(IMAGE))
	[ -e $(IMAGE) ] || truncate -s $(IMAGE_SIZE) $(IMAGE)
	$(VENV)/bin/nbdtrack serve $(IMAGE) --listen $(LISTEN)

test: deps-test venv lint
	$(VENV)/bin/pytest

lint: venv
	$(VENV)/bin/ruff check nbdtrack tests

deps-run:
	@$(MAKE) --no-print-directory _apt PACKAGES="$(RUN_PACKAGES)"

deps-test:
	@$(MAKE) --no-print-directory _apt PACKAGES="$(TEST_PACKAGES)"

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
