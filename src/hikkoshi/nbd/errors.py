"""Errors of the NBD layer."""

from __future__ import annotations

from hikkoshi.nbd.constants import Errno


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot go on."""


class OptionError(Exception):
    """The server refused an option with an NBD_REP_ERR_* reply."""

    def __init__(self, option: int, reply_type: int, message: str) -> None:
        super().__init__(f"option {option} refused (reply {reply_type:#x}): {message}")
        self.option = option
        self.reply_type = reply_type
        self.message = message


class CommandError(Exception):
    """A transmission command failed with an NBD error value."""

    def __init__(self, errno: int, message: str = "") -> None:
        try:
            name = Errno(errno).name
        except ValueError:
            name = f"error {errno}"
        super().__init__(f"{name}: {message}" if message else name)
        self.errno = errno
        self.message = message
