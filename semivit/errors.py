"""Every error this project raises on purpose, in one class hierarchy with no imports of its own.

The command lines (``semivit.runtime.command.run_cli``) sort exceptions by these classes alone:
a :class:`UserError` (and its kinds) is input the user can fix, :class:`StopRequested` is a planned
stop, anything else is a bug.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input the user can fix; the message names the file or setting and the fix."""


class ConfigError(UserError):
    """A setting is unknown, has the wrong type, or a config file cannot be read."""


class DataError(UserError):
    """The data on disk, or a split file, does not match what the config asks for."""


class WeightsError(UserError):
    """A weights file cannot be read safely, or does not fit the model it is meant for."""


class FileFormatError(UserError):
    """A file of this project (JSON metadata, a CSV) is damaged or lacks what it should hold."""


class CheckpointError(UserError):
    """A file of a checkpoint could not be read safely."""


class ClassMismatchError(UserError):
    """A model, generator or synthetic set was made for other classes than the data at hand."""


class RunLockedError(UserError):
    """Another process is writing into the same run folder."""


class OutputDirError(UserError):
    """The run folder cannot be created or written."""


class PseudoLabelCollapse(UserError):
    """The semi stage's confident pseudo-labels cover too few classes (``semi.stop_on_collapse``)."""


class NonFiniteLoss(FloatingPointError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class StopRequested(RuntimeError):
    """Raised when ``stop_after_epoch`` is reached: the run ends as if interrupted, resumable."""
