"""A watchdog for stalled ranks. Every rank keeps a heartbeat file ``<output_dir>/heartbeats/rank<R>.json``
(written by a background thread: the step, what the training loop is doing and since when). When this rank's
current step takes ``stall_factor`` times the running median it logs which ranks are behind; when it makes no
progress for ``timeout_s`` it logs them as an error and ends the process, so every healthy rank exits within the
timeout and the launcher stops the job. A stopped (``kill -STOP``) or dead rank shows as one whose heartbeat has
gone stale: its thread no longer runs. The heartbeat folder must be shared by the nodes (as output_dir is)."""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("cclm.train")
EXIT_STALLED = 3
SYNCING = "synchronising"  # the phase between steps: logging and the ranks' agreement on stopping


class Watchdog:
    def __init__(
        self,
        folder: str | Path,
        rank: int,
        world_size: int,
        timeout_s: float,
        stall_factor: float,
        exit_process=os._exit,
    ):
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.timeout_s, self.stall_factor = float(timeout_s), float(stall_factor)
        self.poll_s = max(0.2, min(5.0, self.timeout_s / 10))
        self._exit = exit_process
        self.step, self.phase = 0, "starting"
        self._progress_at = self._phase_at = time.time()
        self._durations: deque[float] = deque(maxlen=100)
        self._warned_step = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------- training loop side
    def start(self) -> Watchdog:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._watch, name="cclm-watchdog", daemon=True)
        self._thread.start()
        return self

    def set_phase(self, phase: str) -> None:
        self.phase, self._phase_at = phase, time.time()

    def step_done(self, step: int) -> None:
        now = time.time()
        self._durations.append(now - self._progress_at)
        self.step, self._progress_at = step, now
        self.set_phase(SYNCING)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s * 2)

    # ----------------------------------------------------------------------------------------- the thread
    def _heartbeat_path(self, rank: int) -> Path:
        return self.folder / f"rank{rank}.json"

    def _write(self) -> None:
        record = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": self.step,
            "phase": self.phase,
            "phase_since": self._phase_at,
            "time": time.time(),
        }
        tmp = self._heartbeat_path(self.rank).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._heartbeat_path(self.rank))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._write()
            except OSError as err:  # a full or unreachable disk must not end training by itself
                log.warning("watchdog: cannot write the heartbeat (%s)", err)
            idle = time.time() - self._progress_at
            if idle > self.timeout_s:
                self._give_up(idle)
                return
            median = statistics.median(self._durations) if len(self._durations) >= 3 else None
            if median and idle > self.stall_factor * median and self._warned_step != self.step:
                self._warned_step = self.step
                log.warning(
                    "rank %d: step %d has taken %.0f s (median step %.2f s); %s",
                    self.rank,
                    self.step + 1,
                    idle,
                    median,
                    self.describe_others(),
                )

    def _give_up(self, idle: float) -> None:
        message = (
            f"cclm: rank {self.rank} made no progress for {idle:.0f} s (train.collective_timeout_s="
            f"{self.timeout_s:g}) while {self.phase} after step {self.step}; {self.describe_others()}. "
            "Ending this rank so that the job stops."
        )
        log.error(message)
        print(message, file=sys.stderr, flush=True)
        self._exit(EXIT_STALLED)

    def describe_others(self) -> str:
        """Which ranks are behind, from their heartbeats: stale ones (stopped or dead) first."""
        now, stale_after = time.time(), 3 * self.poll_s + 1.0
        behind = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                beat = json.loads(self._heartbeat_path(rank).read_text())
            except (OSError, ValueError):
                behind.append(f"rank {rank}: no heartbeat file")
                continue
            where = f"rank {rank} ({beat['host']}, pid {beat['pid']})"
            if now - beat["time"] > stale_after:
                behind.append(f"{where}: no heartbeat for {now - beat['time']:.0f} s (stopped or dead)")
            elif beat["step"] < self.step or beat["phase"] not in (SYNCING, self.phase):
                behind.append(
                    f"{where}: {beat['phase']} after step {beat['step']} for {now - beat['phase_since']:.0f} s"
                )
        return "behind: " + "; ".join(behind) if behind else "no other rank is behind"
