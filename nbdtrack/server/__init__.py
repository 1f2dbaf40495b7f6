"""asyncio networking: listeners and connections. The only layer that touches sockets."""
