"""Errors of bitmap management, worded as QEMU words them."""


class BitmapError(Exception):
    """A bitmap operation was refused; the message is shown to the user as is."""


class StateError(Exception):
    """The persistent bitmap state could not be read or written."""
