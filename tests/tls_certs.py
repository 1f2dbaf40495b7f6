"""Test certificates, made with the ``openssl`` command at test time.

Layout (one directory per client identity, as libnbd's ``tls-certificates=DIR`` and
QEMU's ``tls-creds-x509,dir=DIR`` expect: ca-cert.pem, client-cert.pem, client-key.pem):

    ca-cert.pem ca-key.pem             the CA the server trusts
    server-cert.pem server-key.pem     the server (localhost, 127.0.0.1, ::1)
    client/                            CN=client1,O=nbdtrack tests, signed by the CA
    other/                             CN=intruder, signed by the CA (not on allow-lists)
    rogue/                             CN=client1, signed by another CA
    anonymous/                         only ca-cert.pem: no client certificate

Extensions are what QEMU's and GnuTLS's checks want (CA basic constraints and key usage,
serverAuth / clientAuth purposes), so the same files serve every client.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_CA_EXT = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
_SERVER_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
)
_CLIENT_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
)


@dataclass(frozen=True)
class Certificates:
    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca-cert.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server-cert.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server-key.pem"

    def client_dir(self, name: str = "client") -> Path:
        return self.root / name

    def server_args(self, mode: str = "require", *, verify_clients: bool = True) -> list[str]:
        args = [f"--tls={mode}", "--tls-cert", str(self.server_cert)]
        args += ["--tls-key", str(self.server_key)]
        if verify_clients:
            args += ["--tls-ca", str(self.ca)]
        return args


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, subject: str) -> None:
    ext = directory / "ca.ext"
    ext.write_text(_CA_EXT)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-subj", subject,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip


def _signed(directory: Path, ca_dir: Path, name: str, subject: str, ext_text: str) -> None:
    ext = directory / f"{name}.ext"
    ext.write_text(ext_text)
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256",
        "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", subject,
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-sha256", "-days", "3",
        "-CA", str(ca_dir / "ca-cert.pem"), "-CAkey", str(ca_dir / "ca-key.pem"),
        "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
        "-extfile", str(ext), "-out", f"{name}-cert.pem",
        cwd=directory,
    )  # fmt: skip
    os.chmod(directory / f"{name}-key.pem", 0o600)


def make_certificates(root: Path) -> Certificates:
    """Make the whole set under ``root`` (about a second: five RSA keys)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is missing (Debian package openssl)")
    root.mkdir(parents=True, exist_ok=True)
    _ca(root, "/CN=nbdtrack test CA")
    _signed(root, root, "server", "/CN=localhost", _SERVER_EXT)
    for name, subject, ca_dir in (
        ("client", "/O=nbdtrack tests/CN=client1", root),
        ("other", "/CN=intruder", root),
        ("rogue", "/O=nbdtrack tests/CN=client1", None),
    ):
        directory = root / name
        directory.mkdir()
        if ca_dir is None:  # its own CA, which the server does not trust
            rogue_ca = directory / "rogue-ca"
            rogue_ca.mkdir()
            _ca(rogue_ca, "/CN=rogue CA")
            ca_dir = rogue_ca
        _signed(directory, ca_dir, "client", subject, _CLIENT_EXT)
        shutil.copy(root / "ca-cert.pem", directory / "ca-cert.pem")  # to verify the server
    anonymous = root / "anonymous"
    anonymous.mkdir()
    shutil.copy(root / "ca-cert.pem", anonymous / "ca-cert.pem")
    return Certificates(root)
