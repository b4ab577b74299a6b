"""One exception type for every user-facing failure.

The CLI turns a `ReadmoeError` into a single line on stderr (no traceback), so each message
must name the problem and the fix on its own.
"""


class ReadmoeError(Exception):
    """A problem with the user's input or environment, explained in one line."""
