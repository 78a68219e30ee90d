"""Stopping on SIGTERM at a step boundary: spot preemption and maintenance.

A TPU VM (or a scheduler) that must stop a job sends SIGTERM and waits a
little before killing it. Long loops run inside `StopOnSignal()`: the signal
only sets a flag; the loop asks `requested()` after each step, saves a
checkpoint for the step it is at, and raises `Preempted`, a SystemExit with
status 143 (128 + SIGTERM), so the process ends without a traceback once the
`finally` blocks (closing checkpointers and writers) have run. The next start
resumes from that checkpoint. A signal that arrives after the loop's last
check is not dropped: leaving the context raises it again for the handler
outside.

On several JAX processes every process must stop at the same step (a
checkpoint save is collective), so `requested()` is true on all of them as
soon as one has seen the signal (an all-gather of the flags, one scalar per
step; skipped on a single process).
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

EXIT_CODE = 128 + signal.SIGTERM


class Preempted(SystemExit):
  """Stopped by a signal after saving; the message says where to resume."""

  def __init__(self, message: str):
    super().__init__(EXIT_CODE)
    self.message = message

  def __str__(self) -> str:
    return self.message


class StopOnSignal:
  """Context manager: while active, SIGTERM (and the other `signals`) set a
  flag instead of ending the process. Outside the main thread, where Python
  cannot install handlers, it does nothing and `requested()` stays False."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = tuple(signals)
    self.received: int | None = None
    self._old = {}

  def _handler(self, signum, frame):
    del frame
    self.received = signum

  def __enter__(self) -> StopOnSignal:
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._old[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old.clear()
    pending, self.received = self.received, None
    if pending is not None and exc_type is None and threading.current_thread() is \
        threading.main_thread():
      # The signal came after the loop's last check (during its final save,
      # say): the run was still asked to stop, so pass it on to the handler
      # outside (main's: exit 143 once the `finally` blocks ran), not drop it.
      signal.raise_signal(pending)

  def requested(self) -> bool:
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

  def stop(self, where: str) -> Preempted:
    """The exception to raise once the checkpoint is saved."""
    name = signal.Signals(self.received).name if self.received else "a signal on another process"
    msg = f"stopped by {name} {where}; start the same command again to resume"
    print(msg, flush=True)
    return Preempted(msg)
