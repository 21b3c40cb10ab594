"""SIGTERM (how TPU VMs and SLURM announce preemption) as a flag the train loop polls once per step."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

# Multi-process runs agree on the flag every this many steps (and at every logging or checkpoint look): one
# host round trip of a bool, cheap next to a step, but not worth paying on every step.
SYNC_EVERY = 10


class StopRequest:
  """While active, SIGTERM sets `requested` instead of killing the process; the previous handler comes back
  on exit. Signal handlers can only be installed from the main thread; elsewhere this is inert."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def poll(self, step: int, look: bool) -> bool:
    """Whether to stop after `step`: the flag, read once (a signal landing mid-step counts at the next step).

    With several processes a SIGTERM reaches them at different moments, yet all must save the same step: they
    stop when any has been signalled, deciding together at every `look` (a logging or checkpoint step) and
    every SYNC_EVERY steps, never in between."""
    requested = self.requested
    if jax.process_count() == 1:
      return requested
    if not (look or step % SYNC_EVERY == 0):
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(requested))).any())
