"""The run's working directory: checked before anything is written to it, and locked while a run uses it."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time

from posjax.errors import ConfigError

LOCK_FILE = 'posjax.lock'


def check(workdir: str) -> str:
  """Creates `workdir` if needed and proves it writable; a path that cannot be one is a ConfigError."""
  if not workdir or not workdir.strip():
    raise ConfigError('--workdir is empty: give the directory for checkpoints, metrics and the tokenizer')
  parent = os.path.abspath(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    what = 'is a file' if parent == os.path.abspath(workdir) else f'is under {parent!r}, which is a file'
    raise ConfigError(f'--workdir {workdir!r} {what}, not a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.posjax-write-test-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'--workdir {workdir!r} cannot be written ({e.strerror or e})') from None
  return workdir


class Lock:
  """An exclusive lock on WORKDIR/posjax.lock for as long as a run uses the workdir, so a second run on it
  refuses at start naming the first. It is a kernel (flock) lock: a run that is killed releases it with its
  last file descriptor, so a stale lock never blocks a restart."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> 'Lock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise ConfigError(f'cannot lock {self.path} ({e.strerror})') from None
      raise ConfigError(f'workdir {os.path.dirname(self.path)!r} is in use by another run ({_holder(self.path)}); '
                        'wait for it to end or use another workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': os.uname().nodename, 'started': time.time(),
                             'command': ' '.join(sys.argv)}).encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the flock
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))
    return f'pid {info["pid"]} on {info["host"]} since {started}: {info["command"]}'
  except (OSError, ValueError, KeyError, TypeError):
    return 'its details are unreadable'
