"""The control protocol: QMP (QEMU Machine Protocol) commands, sans-IO.

JSON bytes go in, JSON bytes and commands to run come out; no socket or event loop
lives here (``nbdtrack.server.control`` is the asyncio adapter). Command names,
arguments and errors follow QEMU so that scripts written for QEMU's bitmap API and
the ``qemu.qmp`` client work unchanged; nbdtrack-only commands start with ``nbdtrack-``.
"""
