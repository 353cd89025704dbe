"""The one error type for bad input: the CLI prints its message (which names the fix) and exits 1."""


class UserError(Exception):
    """Bad input or environment. The message says what is wrong AND how to fix it; nothing was written."""
