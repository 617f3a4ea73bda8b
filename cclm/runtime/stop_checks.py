"""When the ranks next agree on stopping (a stop signal, the time limit). Agreeing is one small all-reduce, a wait
for the device, so it is not done every step; but a check only at log steps would act on SLURM's SIGUSR1
``log_every`` steps late, which for slow steps can outlast the signal's lead before the time limit. So the ranks
check at every log step and besides at least every ``every_s`` seconds: each check measures the slowest rank's
time per step since the previous one, and the next check comes that many seconds later in steps (1 to
``log_every``). The first check follows the first step. Every rank computes the same schedule from the same
all-reduced time."""

from __future__ import annotations

import time

STOP_CHECK_S = 30.0


class StopCheckSchedule:
    def __init__(self, log_every: int, start_step: int, every_s: float = STOP_CHECK_S):
        self.log_every, self.every_s = int(log_every), float(every_s)
        self.next_step = start_step + 1
        self._last_step, self._last_time = start_step, time.monotonic()

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step >= self.next_step

    def seconds_since_last(self) -> float:
        """This rank's time since the previous check (what it contributes to the all-reduce)."""
        return time.monotonic() - self._last_time

    def checked(self, step: int, slowest_seconds: float) -> None:
        """A check happened after ``step``; ``slowest_seconds``: the maximum over ranks of
        :meth:`seconds_since_last`."""
        per_step = slowest_seconds / max(step - self._last_step, 1)
        interval = int(self.every_s / per_step) if per_step > 0 else self.log_every
        self.next_step = step + max(1, min(self.log_every, interval))
        self._last_step, self._last_time = step, time.monotonic()
