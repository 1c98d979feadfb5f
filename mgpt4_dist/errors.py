"""What a user did wrong, and the exit codes every `mgpt4-*` command and the job scripts agree on.

`UserError` is the one base of every error a user can fix (config, data, weights, checkpoint
mismatch, unsupported setting, disk full): a command prints it as one line
`mgpt4-X: error: <message>` and exits `EXIT_USER_ERROR`. Anything else is a bug and keeps its
traceback. The job scripts (slurm/job.sh) read these codes: a user error is never requeued, a
preempted run is.
"""
from __future__ import annotations

# Exit codes (documented in README "Exit codes").
EXIT_OK = 0
EXIT_USER_ERROR = 2          # bad input: fix it and run again; never requeued
EXIT_NONFINITE_ABORT = 3     # train.max_nonfinite_in_row non-finite losses in a row
EXIT_COLLECTIVE_FAILURE = 4  # a peer rank died or hung (fail-fast); crash restarts may follow
EXIT_PREEMPTED = 75          # stopped by a signal before the last step: checkpointed, resumable (EX_TEMPFAIL)


class UserError(Exception):
    """An error the user can fix; its message names the bad key/path/value and what to do."""
