"""nbdtrack: an NBD server with dirty tracking built in."""

__version__ = "0.1.0"
