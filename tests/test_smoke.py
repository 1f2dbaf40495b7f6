"""The server starts, libnbd connects, and a write reads back."""

import nbd


def test_write_read_roundtrip(server):
    h = nbd.NBD()
    h.connect_uri(server.uri())
    assert h.get_size() == 64 * 1024 * 1024
    h.pwrite(b"x" * 4096, 8192)
    assert h.pread(4096, 8192) == b"x" * 4096
    h.shutdown()
