"""The base of every error GRAIL reports to users as a one-line message."""


class GrailError(Exception):
    """An input or state problem the user can fix; the message names the problem and the fix."""
