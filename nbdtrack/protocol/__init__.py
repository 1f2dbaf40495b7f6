"""Sans-IO NBD protocol: bytes in, events out, replies to bytes. No sockets here."""
