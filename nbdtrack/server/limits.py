"""The limits that bound what one client can make the server hold or keep open.

Kept in one small value object so the CLI, the config file and the tests set them the
same way; ``max_connections`` (global) and ``handshake_timeout`` stay on ``NBDServer``.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdtrack.protocol import constants as c
from nbdtrack.protocol.handshake import MAX_OPTION_LENGTH

DEFAULT_MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    # Connections in transmission on one export (0: only the global limit); an export's
    # own ``max_connections`` wins over this default.
    max_connections_per_export: int = 0
    # Close a connection idle this long, or not reading its replies this long (0: never).
    idle_timeout: float = 0.0
    # Request payloads and read data one connection may hold before reading pauses.
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT
    # Longest option data buffered in the handshake (longer: drained, ERR_TOO_BIG).
    max_option_length: int = MAX_OPTION_LENGTH
    # Longest export name or meta-context query (the spec's ceiling is 4096).
    max_name_length: int = c.NBD_MAX_STRING
    # Extents in one BLOCK_STATUS chunk.
    max_extents: int = c.MAX_EXTENTS

    def check(self) -> None:
        """Raise ValueError naming the first limit that makes no sense."""
        if self.max_connections_per_export < 0:
            raise ValueError("max-connections-per-export must be 0 (no limit) or more")
        if self.idle_timeout < 0:
            raise ValueError("idle-timeout must be 0 (off) or more")
        if self.max_bytes_in_flight < 1024 * 1024:
            raise ValueError("max-bytes-in-flight must be at least 1048576")
        if not 1024 <= self.max_option_length <= 64 * 1024 * 1024:
            raise ValueError("max-option-length must be between 1024 and 67108864")
        if not 1 <= self.max_name_length <= c.NBD_MAX_STRING:
            raise ValueError(f"max-name-length must be between 1 and {c.NBD_MAX_STRING}")
        if self.max_extents < 1:
            raise ValueError("max-extents must be at least 1")
