"""Why the worker should stop early: signals, the walltime deadline. Imports nothing heavy.

The worker installs these handlers first thing, before torch and stable-baselines3 load (a few
seconds), so that a SIGTERM during start-up still ends with an exit.json like any other.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

#: Exit codes by exit.json reason (sysexits' EX_TEMPFAIL for walltime, 128 + SIGTERM for signal).
EXIT_CODES = {"done": 0, "failed": 1, "walltime": 75, "signal": 143}


class StopRequest:
    """Why training should stop early, set by signal handlers or by the deadline.

    Handlers only set a flag (a signal can arrive inside torch or a file write); the callbacks
    poll it and stop `learn()` at the next environment step.

    :param deadline: SATRL_DEADLINE, epoch seconds, or None.
    :param margin_s: stop this long before the deadline, leaving time to save.
    """

    def __init__(self, deadline: float | None = None, margin_s: float = 0.0) -> None:
        self.deadline = deadline
        self.margin_s = margin_s
        self.reason: str | None = None
        self.message = ""

    def set(self, reason: str, message: str) -> None:
        if self.reason is None:  # the first cause wins
            self.reason, self.message = reason, message

    def poll(self) -> str | None:
        """The stop reason, checking the deadline first."""
        if (self.reason is None and self.deadline is not None
                and time.time() >= self.deadline - self.margin_s):
            self.set("walltime", f"deadline {self.deadline:.0f} minus a margin of "
                                 f"{self.margin_s:.0f} s reached")
        return self.reason

    def install_handlers(self) -> None:
        """SIGTERM and SIGINT stop with reason signal; SIGUSR1 (a scheduler's warning) walltime."""
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if signum == signal.SIGUSR1:
                self.set("walltime", f"{name} received (the scheduler's walltime warning)")
            else:
                self.set("signal", f"{name} received")

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, on_signal)
