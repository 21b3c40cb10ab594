"""Metrics to DIR/metrics.jsonl (strict JSON: a NaN or infinite value is written as null), to TensorBoard
(tensorboardX: no TensorFlow needed) and, when `config.wandb.project` is set, to Weights & Biases."""

from __future__ import annotations

import json
import math
import os
import time
import uuid

import jax

from posjax.errors import ConfigError

WANDB_ID = 'wandb_id'  # WORKDIR/wandb_id: the W&B run a resumed run goes on logging to


def check_loggers(config) -> None:
  """Before any work: a W&B project needs the wandb package."""
  w = config.get('wandb')
  if w is None or not w.project:
    return
  if not isinstance(w.project, str):
    raise ConfigError(f'wandb.project must be a string (the W&B project name); got {w.project!r}')
  try:
    import wandb  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ConfigError(f'wandb.project is {w.project!r} but the wandb package is not installed; pip install '
                      "wandb (or 'posjax[wandb]'), or leave wandb.project empty") from None


def _wandb_run(config, workdir: str):
  """A W&B run for this workdir: the one it logged to before (its id is kept in WORKDIR/wandb_id), else new."""
  import wandb  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, WANDB_ID)
  if os.path.exists(path):
    with open(path) as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:16]
    with open(path, 'w') as f:
      f.write(run_id + '\n')
  w = config.wandb
  return wandb.init(project=w.project, entity=w.entity or None,
                    name=w.name or os.path.basename(os.path.abspath(workdir)), id=run_id, resume='allow',
                    dir=workdir, config=json.loads(config.to_json_best_effort()))


class Writer:
  """Process 0 writes; others are silent. On resume, jsonl lines beyond the restored step (and any line a
  SIGKILL cut short) are dropped so the file reads as one uninterrupted run; W&B (`config.wandb.project`)
  keeps the values it had for those steps and ignores the repeated ones."""

  def __init__(self, workdir: str, resume_step: int = 0, config=None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    self.wandb = None
    if not self.active:
      return
    if os.path.exists(self.path):
      keep = []
      with open(self.path, encoding='utf-8', errors='replace') as f:
        for line in f:
          row = _row(line)
          if row is not None and row['step'] <= resume_step:
            keep.append(json.dumps(row) + '\n')
      with open(self.path, 'w') as f:
        f.writelines(keep)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    if config is not None and config.get('wandb') is not None and config.wandb.project:
      self.wandb = _wandb_run(config, workdir)

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    finite = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), 'time': time.time(), **finite}, allow_nan=False) + '\n')
    if self.wandb is not None:
      self.wandb.log(scalars, step=int(step))

  def close(self):
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def read(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl` (a line a killed run cut short is left out); [] when there is none."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8', errors='replace') as f:
    return [row for row in map(_row, f) if row is not None]


def _row(line: str):
  """A metrics line as a dict, or None for a line a killed run left half-written."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  return row if isinstance(row, dict) and isinstance(row.get('step'), int) else None


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Rate and ETA over the last interval, from `start_step` (create it once the first step has compiled and
  run, so the ETA leaves compilation out)."""

  def __init__(self, total: int, start_step: int, unit: str = 'steps'):
    self.total, self.unit = total, unit
    self.last_step, self.last_time = start_step, time.perf_counter()

  def update(self, step: int) -> str:
    now = time.perf_counter()
    if step <= self.last_step:
      return f'{step}/{self.total} {self.unit}'
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return f'{rate:.2f} {self.unit}/s, ETA {duration((self.total - step) / rate)}'


def format_scalars(scalars: dict) -> str:
  return ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in scalars.items())
