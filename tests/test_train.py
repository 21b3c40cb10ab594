"""End-to-end pretraining: loss falls, bad input fails clearly, non-finite policies (resume: test_preemption.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, micro_config
from posjax.errors import ConfigError
from posjax.training import pretraining


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def test_loss_falls_and_artifacts_are_written(tmp_path):
  last = pretraining.train_and_evaluate(micro_config(num_train_steps=80), str(tmp_path))
  rows = [r for r in read_metrics(tmp_path) if 'loss' in r]
  assert [r['step'] for r in rows] == list(range(5, 81, 5))
  first, final = rows[0]['loss'], rows[-1]['loss']
  assert final < first - 1.0, (first, final)
  assert last['eval_loss'] < first
  for name in ('tokenizer.json', 'vocab.txt', 'tensorboard', 'checkpoints'):
    assert os.path.exists(tmp_path / name), name
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['40', '60', '80']  # keep_checkpoints=3


def test_workdir_of_another_model_is_refused(tmp_path):
  pretraining.train_and_evaluate(micro_config(num_train_steps=20), str(tmp_path))
  with pytest.raises(ConfigError, match='different model.*model.hidden_size: checkpoint 32 vs config 48'):
    pretraining.train_and_evaluate(micro_config(num_train_steps=30, **{'model.hidden_size': 48}), str(tmp_path))


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
    pretraining.train_and_evaluate(micro_config(**overrides), str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists() or not os.listdir(tmp_path / 'checkpoints')


def test_empty_data_file_fails_before_compiling(tmp_path):
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n\n  \n')
  with pytest.raises(ConfigError, match='no usable text'):
    pretraining.train_and_evaluate(micro_config(**{'data.files': str(empty)}), str(tmp_path / 'w'))


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
    pretraining.train_and_evaluate(micro_config(num_train_steps=60), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['20']
  assert max(r['step'] for r in read_metrics(tmp_path)) == 25


def test_nan_skip_policy_skips_and_counts(tmp_path, monkeypatch):
  inject_nan_at(monkeypatch, 7)
  pretraining.train_and_evaluate(micro_config(num_train_steps=20, nonfinite='skip'), str(tmp_path))
  rows = [r for r in read_metrics(tmp_path) if 'loss' in r]
  assert [r['skipped_updates'] for r in rows] == [0, 1, 1, 1]
  # metrics.jsonl is strict JSON: the NaN of that interval is written as null, not as a bare NaN.
  assert rows[1]['loss'] is None and np.isfinite(rows[-1]['loss']) and rows[-1]['loss'] < rows[0]['loss']
  with open(tmp_path / 'metrics.jsonl') as f:
    for line in f:
      json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} in metrics.jsonl'))


