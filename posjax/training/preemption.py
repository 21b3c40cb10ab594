"""SIGTERM (how TPU VMs and SLURM announce preemption) and SIGINT (Ctrl-C) as a request to stop that the train
loop polls once per step.

Until the loop is `arm`ed (set-up, compilation and the first step, when the workdir holds nothing newer than
what the run resumed from) a signal ends the process at once, with a line saying so: a compilation or a
first step that never ends must not hold a preempted machine. Once armed, the first signal asks the loop to
save at the end of the step and stop; a second one ends the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np

# Multi-process runs agree on the flag every this many steps (and at every logging or checkpoint look): one
# host round trip of a bool, cheap next to a step, but not worth paying on every step.
SYNC_EVERY = 10

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """While active, SIGTERM and SIGINT set `requested` (once armed) instead of killing the process; the previous
  handlers come back on exit. Signal handlers can only be installed from the main thread; elsewhere this is
  inert.

  Python runs a signal handler only between bytecodes of the main thread, which may be inside XLA's compiler
  or a device computation for minutes; so the C-level handler's wakeup byte is read by a thread of ours,
  which acts on the signal at once."""

  def __init__(self):
    self.requested = False
    self.name = ''  # of the signal that asked to stop
    self.armed = False
    self._previous = {}
    self._pipe = None
    self._previous_wakeup = -1
    self._watcher = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    pass  # the watcher thread acts on the wakeup byte, which this handler's presence makes Python write

  def _watch(self, fd: int):
    while True:
      try:
        data = os.read(fd, 1)
      except OSError:
        return
      if not data or data[0] == 0:  # closed, or woken by __exit__
        return
      name = signal.Signals(data[0]).name
      if self.armed and not self.requested:
        self.name = name
        self.requested = True
        continue
      what = ('before the first step completed; nothing newer than the last checkpoint is lost' if not
              self.armed else 'a second time; stopping without finishing the step')
      sys.stderr.write(f'{name} received {what}\n')
      sys.stderr.flush()
      os._exit(128 + data[0])

  def arm(self) -> None:
    """From now on a signal stops the loop at the end of the step, with a checkpoint."""
    self.armed = True

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    r, w = os.pipe()
    os.set_blocking(w, False)
    self._pipe = (r, w)
    self._previous_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for s in SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)
    self._watcher = threading.Thread(target=self._watch, args=(r,), name='posjax-signals', daemon=True)
    self._watcher.start()
    return self

  def __exit__(self, *exc):
    if self._pipe is None:
      return False
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    signal.set_wakeup_fd(self._previous_wakeup)
    r, w = self._pipe
    os.write(w, b'\0')
    self._watcher.join()
    os.close(r)
    os.close(w)
    self._pipe = None
    return False

  def poll(self, step: int, look: bool) -> bool:
    """Whether to stop after `step`: the flag, read once (a signal landing mid-step counts at the next step).

    With several processes a signal reaches them at different moments, yet all must save the same step: they
    stop when any has been signalled, deciding together at every `look` (a logging or checkpoint step) and
    every SYNC_EVERY steps, never in between."""
    requested = self.requested
    if jax.process_count() == 1:
      return requested
    if not (look or step % SYNC_EVERY == 0):
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(requested))).any())
