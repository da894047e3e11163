"""The one error type of the dpt stages: bad input a user can fix (the CLI prints it as one line)."""

from semivit.errors import ClassMismatchError, UserError


class DPTError(UserError):
    """A file, folder or setting does not fit what a dpt stage needs; the message says how to fix it."""


class DPTClassMismatchError(DPTError, ClassMismatchError):
    """A generator or synthetic set was made for other classes than the data or classifier at hand."""
