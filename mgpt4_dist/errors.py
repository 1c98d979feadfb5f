"""What a user did wrong, and the exit codes every `mgpt4-*` command and the job scripts agree on.

`UserError` is the one base of every error a user can fix (config, data, weights, checkpoint
mismatch, unsupported setting, disk full): a command prints it as one line
`mgpt4-X: error: <message>` and exits `EXIT_USER_ERROR`. Anything else is a bug and keeps its
traceback. The job scripts (slurm/job.sh) read these codes: a user error is never requeued, a
preempted run is.
"""
from __future__ import annotations

import os

# Exit codes (documented in README "Exit codes").
EXIT_OK = 0
EXIT_USER_ERROR = 2          # bad input: fix it and run again; never requeued
EXIT_NONFINITE_ABORT = 3     # train.max_nonfinite_in_row non-finite losses in a row
EXIT_COLLECTIVE_FAILURE = 4  # a peer rank died or hung (fail-fast); crash restarts may follow
EXIT_PREEMPTED = 75          # stopped by a signal before the last step: checkpointed, resumable (EX_TEMPFAIL)


class UserError(Exception):
    """An error the user can fix; its message names the bad key/path/value and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (in a flag or a config key) does not exist."""


class InvalidInputError(UserError, ValueError):
    """A value or file content the user gave that cannot be used as it is."""


class CheckpointMismatchError(UserError, ValueError):
    """A weight file or training checkpoint that cannot be read as one, or does not fit the configured
    model; the message names the file, the key and the expected and found shapes."""


class MissingExtraError(UserError, ImportError):
    """A feature was asked for whose optional extra (`pip install 'mgpt4_dist[EXTRA]'`) is not
    installed; `extra` names it, the message says what to install."""

    def __init__(self, message: str, extra: str = ""):
        super().__init__(message)
        self.extra = extra

    def __reduce__(self):  # crosses process boundaries whole (ImportError would drop `extra`)
        return type(self), (str(self), self.extra)


class DiskFullError(UserError, OSError):
    """No space left where the run writes; the message says where, at which step, and what survives."""


def one_line(text: str) -> str:
    """A message as the one line a command prints: inner line breaks become '; '."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines)


def _underlying(error: BaseException):
    """`error`, the errors it was raised from, and the per-rank errors a torch.distributed.checkpoint
    CheckpointException wraps (it derives from BaseException and carries them in `failures`)."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def disk_full_cause(error: BaseException, path: str, min_free_bytes: int = 64 << 20):
    """The write error inside `error` that failed for lack of space under `path`, or None.

    torch.save reports ENOSPC only as `basic_ios::clear: iostream error` or `unexpected pos`, so a
    write error of that kind counts when `path`'s filesystem has under `min_free_bytes` left."""
    import errno
    import shutil

    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return None
    candidates = [e for e in _underlying(error) if isinstance(e, (OSError, RuntimeError))]
    for e in candidates:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return e
    if not candidates:
        return None
    try:
        probe = path
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        full = shutil.disk_usage(probe or ".").free < min_free_bytes
    except OSError:
        return None
    return candidates[-1] if full else None
