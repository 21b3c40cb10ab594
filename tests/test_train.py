"""End-to-end pretraining: loss falls, checkpoints resume at the right step, bad input fails clearly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, micro_config
from posjax.errors import ConfigError
from posjax.training import loop


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def test_loss_falls_and_artifacts_are_written(tmp_path):
  last = loop.train_and_evaluate(micro_config(num_train_steps=60), str(tmp_path))
  rows = [r for r in read_metrics(tmp_path) if 'loss' in r]
  assert [r['step'] for r in rows] == list(range(5, 61, 5))
  first, final = rows[0]['loss'], rows[-1]['loss']
  assert final < first - 1.0, (first, final)
  assert last['eval_loss'] < first
  for name in ('tokenizer.json', 'vocab.txt', 'tensorboard', 'checkpoints'):
    assert os.path.exists(tmp_path / name), name
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['20', '40', '60']


def test_rerun_resumes_and_matches_uninterrupted(tmp_path):
  """Losing the step-40 checkpoint and rerunning redoes steps 21-40 exactly as the first time."""
  loop.train_and_evaluate(micro_config(num_train_steps=40), str(tmp_path))
  full = read_metrics(tmp_path)
  shutil.rmtree(tmp_path / 'checkpoints' / '40')
  loop.train_and_evaluate(micro_config(num_train_steps=40), str(tmp_path))
  split = read_metrics(tmp_path)
  assert [r['step'] for r in split] == [r['step'] for r in full]
  for a, b in zip(full, split):
    for k in ('loss', 'eval_loss'):
      if k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), (a['step'], k)


def test_killed_run_continues_from_last_checkpoint(tmp_path):
  """SIGKILL a train.py process after its first checkpoint; the rerun starts at that checkpoint's step."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--config=configs/bert.py:tiny',
         f'--workdir={workdir}', '--config.model.hidden_size=32', '--config.model.num_heads=2',
         '--config.model.intermediate_size=64', '--config.model.num_layers=1', '--config.data.vocab_size=1000',
         '--config.data.seq_len=32', '--config.batch_size=8', '--config.num_train_steps=100000',
         '--config.checkpoint_every=10', '--config.log_every=5']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = workdir / 'checkpoints'
  deadline = time.time() + 240
  try:
    while time.time() < deadline:
      done = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
      if len(done) >= 2:  # kill mid-run, well after a complete checkpoint
        break
      assert proc.poll() is None, 'training exited early'
      time.sleep(0.2)
    else:
      pytest.fail('no checkpoint within 240 s')
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  saved = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  steps_logged = max(r['step'] for r in read_metrics(workdir))
  target = saved + 10
  out = subprocess.run(cmd[:-3] + [f'--config.num_train_steps={target}', '--config.checkpoint_every=10',
                                   '--config.log_every=5'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resumed from the checkpoint at step {saved}' in out.stderr
  rows = read_metrics(workdir)
  steps = [r['step'] for r in rows if 'loss' in r]
  assert steps == list(range(5, target + 1, 5)), (saved, steps_logged, steps)  # no gap, no duplicate
  assert str(target) in os.listdir(ckpts)


def test_workdir_of_another_model_is_refused(tmp_path):
  loop.train_and_evaluate(micro_config(num_train_steps=20), str(tmp_path))
  with pytest.raises(ConfigError, match='different model.*model.hidden_size: checkpoint 32 vs config 48'):
    loop.train_and_evaluate(micro_config(num_train_steps=30, **{'model.hidden_size': 48}), str(tmp_path))


@pytest.mark.parametrize('overrides, message', [
    ({'data.files': '/nonexistent/*.txt'}, r"data.files: '/nonexistent/\*.txt' matches no file"),
    ({'model.num_heads': 5}, r'model.hidden_size \(32\) must be divisible by model.num_heads \(5\)'),
    ({'model.attention': 'absolut'}, "unknown attention variant 'absolut'; valid names: absolute, alibi, "),
    ({'model.attention': 'absolute+sinusoidal'}, 'cannot be used together'),
    ({'model.hidden_act': 'swish'}, "model.hidden_act 'swish' is not one of gelu"),
    ({'model.dtype': 'float64'}, "model.dtype 'float64' is not one of float32"),
    ({'batch_size': 0}, 'batch_size must be a positive integer'),
    ({'data.seq_len': 1024}, r'data.seq_len \(1024\) exceeds model.max_position_embeddings \(512\)'),
    ({'data.mask_prob': 1.5}, r'data.mask_prob must be in \(0, 1\)'),
    ({'mesh.data': 3}, r'mesh: .* needs 3 devices, but \d+ are present'),
])
def test_bad_config_names_the_field(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    loop.train_and_evaluate(micro_config(**overrides), str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists() or not os.listdir(tmp_path / 'checkpoints')


def test_empty_data_file_fails_before_compiling(tmp_path):
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n\n  \n')
  with pytest.raises(ConfigError, match='no usable text'):
    loop.train_and_evaluate(micro_config(**{'data.files': str(empty)}), str(tmp_path / 'w'))


def run_cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('args, message', [
    (['--config=configs/bert.py:huge'], "unknown model size 'huge'"),
    (['--config=configs/bert.py:tiny,tisaa'], "unknown attention variant 'tisaa'"),
    (['--config=configs/bert.py:tiny', '--config.num_train_step=5'], 'num_train_step'),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
  out = run_cli(*args, f'--workdir={tmp_path}')
  assert out.returncode != 0
  assert message in out.stderr
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
  """Preemption: SIGTERM -> checkpoint at the current step, exit 0; the rerun resumes from exactly there."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--config=configs/bert.py:tiny',
         f'--workdir={workdir}', '--config.model.hidden_size=32', '--config.model.num_heads=2',
         '--config.model.intermediate_size=64', '--config.model.num_layers=1', '--config.data.vocab_size=1000',
         '--config.data.seq_len=32', '--config.batch_size=8', '--config.checkpoint_every=1000',
         '--config.log_every=7']
  proc = subprocess.Popen(cmd + ['--config.num_train_steps=100000'], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  metrics = workdir / 'metrics.jsonl'
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 2):
    assert proc.poll() is None, 'training exited early'
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  saved = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  assert len(saved) == 1 and saved[0] >= 14 and saved[0] % 1000, saved
  assert f'SIGTERM received: wrote the checkpoint at step {saved[0]}' in err
  out = subprocess.run(cmd + [f'--config.num_train_steps={saved[0] + 3}'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resumed from the checkpoint at step {saved[0]}' in out.stderr


def inject_nan_at(monkeypatch, bad_step):
  """Batches whose MLM weights are NaN at one step: the loss (and gradient) of that step is NaN."""
  from posjax.data import pipeline
  original = pipeline.iterator

  def poison(step, batch):
    return {**batch, 'weights': batch['weights'] * np.nan} if step + 1 == bad_step else batch

  monkeypatch.setattr(pipeline, 'iterator', lambda dataset, *a, **k: original(
      dataset.map_with_index(poison), *a, **k))


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  from posjax.errors import NonFiniteError
  inject_nan_at(monkeypatch, 27)
  with pytest.raises(NonFiniteError, match='non-finite loss and grad_norm at step 27.*last good checkpoint is '
                                           'step 20'):
    loop.train_and_evaluate(micro_config(num_train_steps=60), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['20']
  assert max(r['step'] for r in read_metrics(tmp_path)) == 25


def test_nan_skip_policy_skips_and_counts(tmp_path, monkeypatch):
  inject_nan_at(monkeypatch, 7)
  loop.train_and_evaluate(micro_config(num_train_steps=20, nonfinite='skip'), str(tmp_path))
  rows = [r for r in read_metrics(tmp_path) if 'loss' in r]
  assert [r['skipped_updates'] for r in rows] == [0, 1, 1, 1]
  assert np.isnan(rows[1]['loss']) and np.isfinite(rows[-1]['loss']) and rows[-1]['loss'] < rows[0]['loss']


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  loop.train_and_evaluate(micro_config(num_train_steps=40), str(tmp_path))
  full = read_metrics(tmp_path)
  # Damage every data file of the latest checkpoint's state, as a disk fault or a partial copy would.
  damaged = 0
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '40' / 'state'):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.truncate(max(os.path.getsize(path) // 3, 0))
      damaged += 1
  assert damaged
  loop.train_and_evaluate(micro_config(num_train_steps=40), str(tmp_path))
  assert 'checkpoint at step 40' in caplog.text and 'unreadable' in caplog.text
  again = read_metrics(tmp_path)
  assert [r['step'] for r in again] == [r['step'] for r in full]
  for a, b in zip(full, again):
    if 'loss' in a:
      assert a['loss'] == pytest.approx(b['loss'], rel=1e-6, abs=1e-6), a['step']
