"""Socket activation (``LISTEN_FDS``) and listen checks that bind nothing for real.

systemd opens the listening sockets of a ``.socket`` unit itself, starts the service on
the first connection and passes them as descriptors 3, 4, ... with ``LISTEN_FDS``,
``LISTEN_PID`` and ``LISTEN_FDNAMES``. The sockets stay systemd's: a stop or restart of
the service never refuses a client, who waits in the backlog instead. The probes let
``nbdtrack check-config`` say "port in use" before a restart would find out.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

SD_LISTEN_FDS_START = 3


class ActivationError(Exception):
    """The passed descriptors are not what a socket unit for nbdtrack passes."""


def inherited_sockets() -> list[tuple[str, socket.socket]]:
    """The (name, listening socket) pairs systemd passed; [] when not socket-activated.

    The ``LISTEN_*`` variables are removed either way, as ``sd_listen_fds(1)`` does, so
    nothing started later mistakes them for its own.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()) or not count:
        return []
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number")
    n = int(count)
    labels = names.split(":") if names else []
    labels += ["unknown"] * (n - len(labels))
    sockets = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        where = f"LISTEN_FDS: descriptor {fd} ('{labels[i]}')"
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise ActivationError(f"{where}: not a socket: {err.strerror or err}") from None
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_INET,
            socket.AF_INET6,
            socket.AF_UNIX,
        ):
            raise ActivationError(f"{where}: not a TCP or unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"{where}: not listening (Accept=yes is not supported)")
        sock.setblocking(False)
        sockets.append((labels[i], sock))
    return sockets


def probe_tcp(host: str, port: int) -> None:
    """Bind every address ``host`` resolves to, as the server would; raises OSError."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)


def probe_unix(path: str) -> None:
    """Raise OSError if a unix socket could not be made at ``path`` (in use, no directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OSError(errno.ENOENT, f"directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"directory {directory} is not writable")
    stale_unix_socket(path)  # a stale one: the server replaces it


def stale_unix_socket(path: str) -> bool:
    """True if a socket nobody listens on sits at ``path`` (left by a dead server);
    False if nothing does. Raises OSError if ``path`` is not a socket or is live."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return True
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another running server")
