"""The base of every error GRAIL reports to users as a one-line message."""


class GrailError(Exception):
    """An input or state problem the user can fix; the message names the problem and the fix."""


class OutOfMemory(GrailError):
    """The run needed more memory than the device (or host) had; the message says what would fit."""
