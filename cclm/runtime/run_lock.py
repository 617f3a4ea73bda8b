"""One live run per output folder, and an output folder that every rank sees.

The main rank holds an exclusive ``flock`` on ``<output_dir>/.run.lock`` from the moment it claims the folder
(after every configuration check, before the first write) to the end of the run, so a second job into the same
folder (a script submitted twice, a job array without ``%1``) is refused instead of interleaving its metrics and
checkpoints with the first. The lock file also records who holds it, for that refusal, and a token that every
other rank must read back: a folder on node-local disks (``/local/scratch/run`` on several nodes) is refused at
the start, not found out at the first resume.

The kernel drops a ``flock`` when its process dies, so a killed run never leaves a stale lock behind. A file
system without locks (some NFS mounts) is warned about once, and the run goes on unlocked."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from cclm.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"

# (device, inode) of a lock file -> [descriptor, holders]: trainers of one process share its lock (stages run one
# after another in one process; a lock is per open file, so a second open would refuse its own process)
_held: dict[tuple[int, int], list[int]] = {}  # [descriptor, holders, generation]
# a fresh lock of a folder gets a new generation: a lock object of an earlier, let-go one releases nothing
_generations = itertools.count()


class OutputDirLock:
    """The main rank's lock on one output folder; :meth:`release` is idempotent."""

    def __init__(self, path: Path, key: tuple[int, int] | None):
        self.path, self._key = path, key
        self._generation = _held[key][2] if key in _held else None

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the kernel drops the lock anyway
            pass

    def follow(self, path: Path) -> OutputDirLock:
        """The lock of ``path`` after its run was moved aside (``overwrite=true``): the held file went with the
        old run, so the fresh folder gets a lock of its own."""
        # a file system without locks (warned about already): the fresh folder is on it too
        if self._key is None:
            return OutputDirLock(path, None)
        lock_file = path / LOCK_FILE
        if lock_file.exists():
            stat = lock_file.stat()
            if (stat.st_dev, stat.st_ino) == self._key:
                return self
        self.release()
        return _acquire(path)

    def record(self, token: str) -> None:
        """Write who holds the folder, and ``token``, into the lock file."""
        text = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "token": token,
            }
        )
        if self._key is None:  # not locked: a plain write
            (self.path / LOCK_FILE).write_text(text + "\n")
            return
        fd = _held[self._key][0]
        os.ftruncate(fd, 0)
        os.pwrite(fd, (text + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        key, self._key = self._key, None
        if key in _held and _held[key][2] == self._generation:
            _unhold(key)


def _describe(lock_file: Path) -> str:
    try:
        holder = json.loads(lock_file.read_text())
        where = f"pid {holder['pid']} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
    if holder.get("slurm_job"):
        where += f", SLURM job {holder['slurm_job']}"
    return f"{where}, started {holder.get('started')}"


def _acquire(path: Path) -> OutputDirLock:
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / LOCK_FILE
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    stat = os.fstat(fd)
    key = (stat.st_dev, stat.st_ino)
    if key in _held:
        os.close(fd)
        _held[key][1] += 1
        _pin(key, fresh=False)
        return OutputDirLock(path, key)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"output_dir={path} is in use by a running job ({_describe(lock_file)}): two runs into one folder "
            "would mix their metrics and checkpoints; wait for it to end (resume=auto then continues it), or "
            "choose another output_dir"
        ) from None
    except OSError as err:  # ENOLCK, EOPNOTSUPP: a file system without locks
        os.close(fd)
        log.warning(
            "%s cannot be locked (%s): nothing stops a second job from writing into this output_dir at the "
            "same time",
            lock_file,
            os.strerror(err.errno) if err.errno else err,
        )
        return OutputDirLock(path, None)
    _held[key] = [fd, 1, next(_generations)]
    _pin(key, fresh=True)
    return OutputDirLock(path, key)


# each open held_until_exit() block, innermost last: key -> whether the block took the lock first (else it was
# held already when the block began using it)
_scopes: list[dict[tuple[int, int], bool]] = []


def _pin(key: tuple[int, int], fresh: bool) -> None:
    if _scopes and key not in _scopes[-1]:
        _scopes[-1][key] = fresh
        _held[key][1] += 1


@contextlib.contextmanager
def held_until_exit():
    """Keep every output folder that this process locks inside the block locked until the block ends, then let
    go of those it locked first (whatever trainer objects still hold them, collected or not; a lock held before
    the block stays): a recipe writes its results into a stage's folder after the stage's trainer is done, and
    another job must not take the folder in between, nor be refused after the recipe has returned."""
    _scopes.append({})
    try:
        yield
    finally:
        for key, fresh in _scopes.pop().items():
            if fresh and key in _held:
                _held[key][1] = 1
            _unhold(key)


def _unhold(key: tuple[int, int]) -> None:
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        fd = _held.pop(key)[0]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _token_on_disk(path: Path) -> str | None:
    try:
        return json.loads((path / LOCK_FILE).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def hold_output_dir(path: str | Path, is_main: bool, claim: Callable[[], None]) -> OutputDirLock | None:
    """Every rank calls this together. The main rank locks ``path`` (creating it), runs ``claim`` under the lock
    (checks, moving an old run aside), locks the folder that ``claim`` leaves and writes a fresh token into its
    lock file, which every other rank must read back. A refusal (another job holds the folder, ``claim`` failed,
    a rank does not see the main rank's file) is raised on every rank, in one line. Returns the main rank's lock
    (None elsewhere)."""
    path = Path(path)
    token, lock, failure = uuid.uuid4().hex, None, None
    if is_main:
        try:
            lock = _acquire(path)
            claim()
            lock = lock.follow(path)
            lock.record(token)
        except Exception as err:
            if lock is not None:
                lock.release()
            if not _several_ranks():
                raise
            failure = err
    if not _several_ranks():
        return lock
    shared = [token, None if failure is None else str(failure)]
    dist.broadcast_object_list(shared, src=0)
    token, refusal = shared
    if failure is not None:
        raise failure
    if refusal is not None:
        raise UserError(f"rank 0 could not claim output_dir={path}: {refusal}")
    seen = _token_on_disk(path) == token
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (seen, socket.gethostname()))
    blind = [f"{rank} ({host})" for rank, (ok, host) in enumerate(everyone) if not ok]
    if blind:
        if lock is not None:
            lock.release()
        raise UserError(
            f"output_dir={path} is not one folder shared by every rank: rank(s) {', '.join(blind)} do not see the "
            f"{LOCK_FILE} that rank 0 just wrote there (node-local disks?); put output_dir on a file system "
            "that every node mounts at the same path"
        )
    return lock
