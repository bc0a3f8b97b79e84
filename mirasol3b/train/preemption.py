"""Preemption: `PreemptionGuard` turns SIGTERM (and SIGINT) into a flag; the loop asks
`guard.should_stop(step)` after each step, force-saves, waits for the write and exits with
`PREEMPTED_EXIT_CODE` (143 = 128 + SIGTERM, what a process killed by SIGTERM reports, so a
scheduler restarts the job rather than marking it complete). With several processes a host's own
flag is not enough: every host must save at the same step, so `should_stop` then asks
`jax.experimental.multihost_utils.reached_preemption_sync_point(step)`, for which
`jax.distributed` (its preemption service, on by default) catches SIGTERM itself and agrees on the
step; the guard installs no Python handler there, as it would replace that one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM


class PreemptionGuard:
    """`with PreemptionGuard() as guard:` SIGTERM/SIGINT only set a flag; the loop, after each step:

        if guard.should_stop(step):
            checkpointer.maybe_save(step, state, data_state, config, force=True)
            checkpointer.wait()
            ...leave the loop; the program exits with `guard.exit_code` (143 after SIGTERM)

    A second SIGINT raises KeyboardInterrupt (a person pressing Ctrl-C twice means now).
    Handlers can only be installed from the main thread; elsewhere the guard warns and only
    `request()` sets the flag. Several processes: see the module docstring.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.signal_received: int | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if jax.process_count() > 1:
            logging.info("PreemptionGuard: %d processes; jax.distributed's preemption service catches "
                         "SIGTERM and should_stop() waits for its agreed step", jax.process_count())
        elif threading.current_thread() is not threading.main_thread():
            logging.warning("PreemptionGuard: not the main thread; no signal handler installed")
        else:
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous.clear()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt
        self.signal_received = signum
        self._event.set()
        # Not `logging`: a handler runs between two bytecodes of the main thread, which may hold its lock.
        with contextlib.suppress(Exception):  # no usable stderr: the flag is what matters
            os.write(sys.stderr.fileno(), f"received signal {signum}: will save a checkpoint and stop\n".encode())

    def request(self) -> None:
        """Asks the loop to save and stop, as a signal would."""
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def exit_code(self) -> int:
        """What to exit with after the final save: 128 + the signal (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signal_received if self.signal_received else PREEMPTED_EXIT_CODE

    def should_stop(self, step: int) -> bool:
        """True when the loop should save `step` and stop; the same answer on every process."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(int(step))
        return self.requested
