#!/bin/sh
# Runs INSIDE the container (cwd and $UNITS: the unit directory, read-only): installs
# nbdtrack from the wheels built on the host, its units, a config and the images.
set -e
if python3 -m venv /opt/nbdtrack >/dev/null 2>&1; then
    /opt/nbdtrack/bin/pip install -q --no-index --find-links "$UNITS/wheels" nbdtrack
else
    # A rootfs built without python3-venv: unpack the wheels instead (same Python 3.11).
    rm -rf /opt/nbdtrack && mkdir -p /opt/nbdtrack/site /opt/nbdtrack/bin
    for wheel in "$UNITS"/wheels/*.whl; do python3 -m zipfile -e "$wheel" /opt/nbdtrack/site; done
    printf '#!/bin/sh\nPYTHONPATH=/opt/nbdtrack/site exec /usr/bin/python3 "$@"\n' \
        > /opt/nbdtrack/bin/python
    printf '#!/bin/sh\nexec /opt/nbdtrack/bin/python -m nbdtrack "$@"\n' > /opt/nbdtrack/bin/nbdtrack
    chmod 0755 /opt/nbdtrack/bin/python /opt/nbdtrack/bin/nbdtrack
fi
ln -sf /opt/nbdtrack/bin/nbdtrack /usr/local/bin/nbdtrack
install -m 0644 "$UNITS"/nbdtrack.service "$UNITS"/nbdtrack.socket "$UNITS"/templates/* \
    /etc/systemd/system/
install -D -m 0644 "$UNITS/config/nbdtrack.toml" /etc/nbdtrack/nbdtrack.toml
install -D -m 0644 "$UNITS/config/b.toml" /etc/nbdtrack/b.toml
mkdir -p /var/lib/nbdtrack/images
truncate -s 64M /var/lib/nbdtrack/images/disk.img
truncate -s 16M /var/lib/nbdtrack/images/b.img
nbdtrack check-config /etc/nbdtrack/nbdtrack.toml
