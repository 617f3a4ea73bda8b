"""Errors a user can act on. Every ``cclm`` command prints one of these as a single line naming the file, key or
rank at fault and exits with status 2; anything else is a bug and keeps its traceback (``CCLM_DEBUG=1`` shows
the traceback of a user error too)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad config, a corrupt or unsafe file: the message says what and where."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (incomplete, corrupt, unsafe, or from another world size); names the file."""


class DataError(UserError):
    """A data file or shard that cannot be used; names the file (and line or member where there is one)."""


class StalledRankError(UserError):
    """A rank stopped making progress for longer than the collective timeout."""


class RunInterrupted(SystemExit):
    """Training stopped on a signal (SLURM's warning before the time limit) after saving a checkpoint; the
    process exits with status 0 and ``resume=auto`` continues the run."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message

    def __str__(self) -> str:
        return self.message
