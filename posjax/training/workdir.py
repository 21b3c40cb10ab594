"""The run's working directory: checked before anything is written to it, and locked while a run uses it."""

from __future__ import annotations

import os

from posjax import locks
from posjax.errors import ConfigError

LOCK_FILE = 'posjax.lock'
# What a run writes in its workdir, and whether each is a directory.
LAYOUT = {'checkpoints': True, 'tensorboard': True, 'metrics.jsonl': False, 'tokenizer.json': False,
          'vocab.txt': False, 'spiece.model': False, 'config.json': False, 'results.json': False, 'predictions': True,
          LOCK_FILE: False}


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
  for name, is_dir in LAYOUT.items():
    path = os.path.join(workdir, name)
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
      raise ConfigError(f'{path} is a {"file" if is_dir else "directory"}; the run writes a '
                        f'{"directory" if is_dir else "file"} there: move it away')
  return workdir


def lock(workdir: str) -> locks.Lock:
  """The lock a run holds on its workdir (a second run refuses at start, naming the first)."""
  return locks.Lock(os.path.join(workdir, LOCK_FILE), f'workdir {workdir!r}').acquire()
