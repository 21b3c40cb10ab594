"""Preemption and resume: SIGKILL and SIGTERM at random steps lose nothing and change nothing (bitwise, on CPU);
multi-process runs agree on the step to stop at."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import ROOT, xla_flags
from posjax.training import preemption

MICRO = ['--config=configs/bert.py:tiny', '--config.model.hidden_size=32', '--config.model.num_heads=2',
         '--config.model.intermediate_size=64', '--config.model.num_layers=1', '--config.model.hidden_dropout=0.1',
         '--config.data.vocab_size=1000', '--config.data.seq_len=32', '--config.batch_size=8',
         '--config.eval_every=100000', '--config.eval_batches=1', '--config.log_every=1']


def train_cmd(workdir, steps, checkpoint_every, extra=()):
  return [sys.executable, os.path.join(ROOT, 'train.py'), f'--workdir={workdir}', *MICRO,
          f'--config.num_train_steps={steps}', f'--config.checkpoint_every={checkpoint_every}', *extra]


def env_with_cache(cache, **extra):
  # Every process compiles the same steps; the persistent cache compiles them once.
  return {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(cache),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
          **extra}


def logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().split('\n')
  steps = []
  for line in lines:
    try:
      steps.append(json.loads(line)['step'])
    except (json.JSONDecodeError, KeyError, TypeError):
      pass
  return max(steps, default=0)


def finalised_steps(workdir):
  ckpts = os.path.join(workdir, 'checkpoints')
  return [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []


def run_until(cmd, env, workdir, at_step, sig, timeout=300, after_a_checkpoint=False):
  """Starts `cmd`, sends `sig` once metrics.jsonl shows step `at_step` (and, if asked, once a checkpoint is
  finalised); returns (returncode, stderr)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  try:
    while logged_steps(workdir) < at_step or (after_a_checkpoint and not finalised_steps(workdir)):
      assert proc.poll() is None, f'training ended before step {at_step}: {proc.stderr.read()[-3000:]}'
      assert time.time() < deadline, f'no step {at_step} within {timeout} s'
      time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, err


def final_state(workdir, step):
  """The saved state on this process's one device, whatever mesh wrote it."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                        ocp.StandardCheckpointer().metadata(path).item_metadata)
  return ocp.StandardCheckpointer().restore(path, target)


def flat(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def metrics_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(l).items() if k != 'time'} for l in f]


def kill_term_resume_matches_uninterrupted(tmp_path, steps, checkpoint_every, extra=(), env_extra=None):
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  env = env_with_cache(tmp_path / 'cache', **(env_extra or {}))
  full, split = tmp_path / 'full', tmp_path / 'split'
  out = subprocess.run(train_cmd(full, steps, checkpoint_every, extra), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]

  cmd = train_cmd(split, steps, checkpoint_every, extra)
  kill_at = rng.randrange(checkpoint_every + 1, steps // 2)
  code, _ = run_until(cmd, env, split, kill_at, signal.SIGKILL, after_a_checkpoint=True)
  assert code == -signal.SIGKILL
  # Orbax finalises a checkpoint only once it is fully written: a kill during a save leaves the previous one.
  saved = max(finalised_steps(split))
  kill_at = max(kill_at, logged_steps(split))
  term_at = rng.randrange(min(kill_at, steps - 41) + 1, steps - 40)  # margin: it must land before the end
  code, err = run_until(cmd, env, split, term_at, signal.SIGTERM)
  assert code == 0, err[-3000:]
  assert f'resumed from the checkpoint at step {saved}' in err
  assert 'SIGTERM received: wrote the checkpoint at step ' in err, f'seed {seed}: {err[-2000:]}'
  stopped = int(err.split('SIGTERM received: wrote the checkpoint at step ')[1].split()[0])
  assert term_at <= stopped < steps, (seed, term_at, stopped)
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resumed from the checkpoint at step {stopped}' in out.stderr

  a, b = flat(final_state(full, steps)), flat(final_state(split, steps))
  assert a.keys() == b.keys()
  differ = [k for k in a if a[k].tobytes() != b[k].tobytes()]
  assert not differ, (f'seed {seed}: killed at {kill_at}, resumed from {saved}, stopped at {stopped}; '
                      f'leaves not bitwise equal: {differ[:5]}')
  assert metrics_rows(split) == metrics_rows(full), f'seed {seed}: the logged metrics differ'
  print(f'seed {seed}: SIGKILL at step >= {kill_at}, resumed from {saved}, SIGTERM saved {stopped}, all {steps} bitwise equal')
  return kill_at, saved, stopped


def test_sigkill_then_sigterm_then_resume_is_bitwise_uninterrupted(tmp_path):
  kill_term_resume_matches_uninterrupted(tmp_path, steps=120, checkpoint_every=20)


@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_under_fsdp8(tmp_path):
  kill_term_resume_matches_uninterrupted(
      tmp_path, steps=120, checkpoint_every=20, extra=['--config.mesh.fsdp=8', '--config.mesh.data=1'],
      env_extra={'XLA_FLAGS': xla_flags(8)})


class FakeProcesses:
  """process_count() and process_allgather as N processes would see them; this process is index 0."""

  def __init__(self, monkeypatch, others):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    self.others, self.calls = others, []
    monkeypatch.setattr(preemption.jax, 'process_count', lambda: 1 + len(others))
    monkeypatch.setattr(multihost_utils, 'process_allgather', self.allgather)

  def allgather(self, x):
    self.calls.append(bool(x))
    return np.array([bool(x)] + [o() for o in self.others])


def test_processes_agree_on_the_step_to_stop_at(monkeypatch):
  """Process 1 is signalled at step 13, process 0 never: both stop after step 20, the next agreement."""
  step_now = [0]
  FakeProcesses(monkeypatch, [lambda: step_now[0] >= 13])
  stop = preemption.StopRequest()
  decided = []
  for step in range(1, 40):
    step_now[0] = step
    if stop.poll(step, look=step % 25 == 0):
      decided.append(step)
      break
  assert decided == [20]


def test_a_look_step_syncs_and_own_signal_counts(monkeypatch):
  fake = FakeProcesses(monkeypatch, [lambda: False, lambda: False])
  stop = preemption.StopRequest()
  assert not stop.poll(7, look=False) and not fake.calls  # between agreements: no round trip
  stop.requested = True
  assert not stop.poll(7, look=False)  # signalled, but the others have not been told yet
  assert stop.poll(8, look=True) and fake.calls == [True]


def test_single_process_reads_the_flag_every_step():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopRequest() as stop:
    stop.arm()  # unarmed, a signal ends the process (test_work_lost.py)
    assert not stop.poll(3, look=False)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not stop.requested and time.time() < deadline:  # a thread of its own reads the signal
      time.sleep(0.01)
    assert stop.requested and stop.poll(3, look=False)
  assert signal.getsignal(signal.SIGTERM) == previous  # the previous handler is back


def test_metrics_writer_resumes_over_a_half_written_line(tmp_path):
  from posjax.training import metrics  # pylint: disable=g-import-not-at-top
  rows = [json.dumps({'step': s, 'time': 0.0, 'loss': 1.0 / s}) for s in (5, 10, 15)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(rows) + '\n{"step": 20, "time": 0.0, "lo')
  writer = metrics.Writer(str(tmp_path), resume_step=10)
  writer.write(15, {'loss': 0.5})
  writer.close()
  got = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in got] == [5, 10, 15] and got[-1]['loss'] == 0.5
