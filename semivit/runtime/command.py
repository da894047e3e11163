"""The one error policy of both command lines (``semivit``, ``dpt``).

Policy, applied by :func:`run_cli`:

* user errors end with one line ``<prog> <command>: error: <message>`` on stderr and exit code 2:
  settings (:class:`~semivit.errors.ConfigError`), data (``DataError``), files, weights, class
  lists and run locks (:class:`UserError` and its kinds, ``DPTError``), files and folders the
  operating system refuses (``OSError``: missing, unwritable, disk full), a non-finite loss
  (``FloatingPointError``), running out of memory, and a ``ValueError`` raised by this project's
  own code (its messages are written for the user);
* ``stop_after_epoch`` ends with one line and exit code 0; Ctrl-C with one line and exit code 130;
* anything else is a bug (an exception raised inside torch, timm, diffusers ... that validation
  did not foresee, an assertion, a ``KeyError``): the traceback stays, followed by one line that
  says so, exit code 1;
* ``--debug`` or ``DPT_DEBUG=1`` prints the traceback for user errors too;
* a ``key=value`` override the command does not read is a user error, reported before anything
  runs (:func:`check_unread`); ``--allow-unread`` turns it into a warning line (docs/cli.md).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from semivit.config.reads import Reads, unread_settings
from semivit.errors import ConfigError, NonFiniteLoss, StopRequested, UserError

EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


def debug_requested(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get("DPT_DEBUG", "").strip().lower() in ("1", "true", "yes")


def run_cli(prog: str, command: str, body: Callable[[], object], debug: bool = False) -> int:
    """Run one command under the error policy above; returns the exit code."""
    ok = False
    try:
        body()
        ok = True
        return 0
    except KeyboardInterrupt:
        _say(prog, command, "interrupted; run the same command again to continue from the last saved state")
        return EXIT_INTERRUPTED
    except BaseException as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if isinstance(e, SystemExit):
            raise
        if isinstance(e, StopRequested):
            _say(prog, command, str(e))
            ok = True
            return 0
        if is_user_error(e):
            if debug_requested(debug):
                traceback.print_exc()
            _say(prog, command, "error: " + error_message(e))
            return EXIT_USER_ERROR
        traceback.print_exc()
        _say(
            prog,
            command,
            f"internal error ({type(e).__name__}, a bug rather than your input): please report it with the "
            "traceback above",
        )
        return EXIT_BUG
    finally:
        _leave_process_group(ok)


def check_unread(prog: str, command: str, overrides: list[str], reads: Reads, allow: bool = False) -> list[str]:
    """Raise a ``ConfigError`` naming every override ``<prog> <command>`` does not read; with
    ``allow`` print each as a warning line instead. Returns the sentences."""
    found = unread_settings(overrides, reads, f"{prog} {command}")
    if found and not allow:
        them = "it" if len(found) == 1 else "them"
        raise ConfigError("; ".join(found) + f"; remove {them}, or pass --allow-unread to run anyway")
    for sentence in found:
        _say(prog, command, f"warning: {sentence}; ignored (--allow-unread)")
    return found


def _say(prog: str, command: str, text: str) -> None:
    print(f"{prog} {command}: {text}", file=sys.stderr, flush=True)


def _leave_process_group(ok: bool) -> None:
    if "torch" in sys.modules:  # no torch, no process group (and no slow import for an error)
        from semivit.runtime.accelerator import leave_process_group

        leave_process_group(ok)


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, (UserError, NonFiniteLoss, MemoryError)) or type(e).__name__ == "OutOfMemoryError":
        return True  # torch.OutOfMemoryError by name: no torch import for an error that torch did not raise
    if isinstance(e, OSError):  # files and folders: missing, not writable, disk full, not a folder
        return True
    return False


def error_message(e: BaseException) -> str:
    """The first line of the message, with what the exception type adds when it says more."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return (
            "out of memory: lower the batch size of the running stage (e.g. semi.batch_size, "
            "diffusion.batch_size, generate.batch_size) or use amp=bf16"
        )
    if isinstance(e, OSError) and not isinstance(e, UserError):
        return _os_error_message(e)
    text = _unwrap_worker_message(str(e).strip())
    if isinstance(e, KeyError) or not text:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    first = text.splitlines()[0]
    return first if first == text else first + " (--debug shows the rest)"


def _unwrap_worker_message(text: str) -> str:
    """An error raised in a DataLoader worker comes back as ``Caught X in DataLoader worker ...``
    followed by the worker's traceback; its last line holds the message that matters."""
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = text.splitlines()[-1].strip()
    head, sep, message = last.partition(": ")
    return message if sep and " " not in head else last


def _os_error_message(e: OSError) -> str:
    """``[Errno 13] Permission denied: 'x'`` -> ``cannot use 'x': permission denied``."""
    if e.filename is None:
        return str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    reason = (e.strerror or type(e).__name__).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    target = f"'{e.filename}'" + (f" -> '{e.filename2}'" if e.filename2 else "")
    if isinstance(e, FileNotFoundError):
        return f"{target} not found; check the path in the config or override"
    return f"cannot use {target}: {reason}"
