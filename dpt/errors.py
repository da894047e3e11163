"""The one error type of the dpt stages: bad input a user can fix (the CLI prints it as one line)."""


class DPTError(ValueError):
    """A file, folder or setting does not fit what a dpt stage needs; the message says how to fix it."""
