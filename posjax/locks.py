"""Kernel file locks (flock): released with the process that holds them, so a killed run never leaves a lock
that blocks the next one. A run's workdir lock refuses a second run; `locked` makes concurrent preparations of
the same data wait for each other, and lets the one holding it clear what dead runs left behind."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time

from posjax.errors import ConfigError


class Lock:
  """An exclusive lock on `path`; `acquire` refuses (ConfigError naming the holder) when another process has it."""

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    self._fd = None

  def acquire(self) -> 'Lock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise ConfigError(f'cannot lock {self.path} ({e.strerror})') from None
      raise ConfigError(f'{self.what} is in use by another run ({_holder(self.path)}); wait for it to end or use '
                        'another one') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': os.uname().nodename, 'started': time.time(),
                             'command': ' '.join(sys.argv)}).encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the flock
      self._fd = None


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))
    return f'pid {info["pid"]} on {info["host"]} since {started}: {info["command"]}'
  except (OSError, ValueError, KeyError, TypeError):
    return 'its details are unreadable'


@contextlib.contextmanager
def locked(path: str):
  """Holds an exclusive lock on `path` (created if needed), waiting for another holder to finish."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)
