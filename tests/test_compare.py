"""posjax.compare: its configs are posjax/configs/bert.py's with the run length set, its tables and plot come
from the runs' metrics.jsonl, bad arguments stop before any training; one real end-to-end run (the `--quick` recipe, shortened) is `slow`
(the quickstart notebook test runs `compare.run` end to end in the default suite)."""

import csv
import json
import os

import pytest

from helpers import load_config_module
from posjax import compare


def test_config_is_configs_bert_with_the_run_length():
  bert = load_config_module('bert')
  ours = compare.make_config('mini', 'tisa+convq', 1000, seed=3)
  theirs = bert.get_config('mini,tisa+convq')
  assert ours.model.to_dict() == theirs.model.to_dict()
  assert (ours.objective, ours.data.to_dict(), ours.learning_rate) == (
      theirs.objective, theirs.data.to_dict(), theirs.learning_rate)
  assert (ours.seed, ours.num_train_steps, ours.eval_every, ours.checkpoint_every) == (3, 1000, 1000, 1000)
  c = compare.make_config('tiny', 'absolute', 10, overrides={'data.seq_len': 64, 'batch_size': 8})
  assert (c.data.seq_len, c.batch_size) == (64, 8)


@pytest.mark.parametrize('argv, message', [
    (['--variants', 'absolute,tisaa', '--steps', '2'], "unknown attention variant 'tisaa'"),
    (['--variants', 'tisa,tisa', '--steps', '2'], 'names a variant twice'),
    (['--variants', 'tisa', '--steps', '2', '--set', 'data.seq_lenn=3'], "unknown config field --set data.seq_lenn"),
    (['--variants', 'tisa', '--steps', '2', '--set', 'batch_size'], 'write FIELD=VALUE'),
    (['--steps', '2'], '--variants is empty'),
    (['--variants', 'tisa', '--extrapolate', '2,x'], '--extrapolate'),
    (['--variants', 'tisa', '--glue', 'sst3', '--glue_dir', '.'], 'sst3'),
    (['--variants', 'tisa', '--glue', 'sst2'], '--glue needs --glue_dir'),
    (['--variants', 'tisa', '--glue', 'sst2', '--glue_dir', '.', '--glue_set', 'num_stepz=3'], 'num_stepz'),
])
def test_bad_arguments_stop_before_training(tmp_path, capsys, argv, message):
  assert compare.main(argv + ['--out', str(tmp_path / 'o')]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'o').exists()


def _fake_run(workdir, losses, eval_loss):
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i, loss in enumerate(losses):
      f.write(json.dumps({'step': 10 * (i + 1), 'time': 0.0, 'loss': loss, 'accuracy': 0.1}) + '\n')
    f.write(json.dumps({'step': 10 * len(losses), 'time': 0.0, 'eval_loss': eval_loss,
                        'eval_accuracy': 0.25}) + '\n')


def test_table_and_plot_from_metrics(tmp_path):
  _fake_run(tmp_path / 'absolute', [9.0, 7.0, 6.0], 6.5)
  _fake_run(tmp_path / 'tisa-convq', [9.0, 6.5, 5.5], 6.0)
  m = compare.read_metrics(str(tmp_path / 'tisa-convq'))
  assert (m['step'], m['loss'], m['eval_step'], m['eval_loss']) == ([10, 20, 30], [9.0, 6.5, 5.5], [30], [6.0])
  assert compare.workdir_name('tisa+convq') == 'tisa-convq'
  rows = [{'variant': 'absolute', 'parameters': 1234567, 'steps': 30, 'train_loss': 6.0, 'eval_loss': 6.5,
           'eval_accuracy': 0.25, 'tau_layer0': 0.031, 'seconds': 12.3},
          {'variant': 'tisa+convq', 'parameters': 1000, 'steps': 30, 'train_loss': 5.5, 'eval_loss': 6.0,
           'eval_accuracy': 0.25, 'tau_layer0': None, 'seconds': 9.0, 'glue_sst2': 0.8}]
  compare.write_table(rows, str(tmp_path), 'tiny, 30 steps')
  md = (tmp_path / 'results.md').read_text()
  assert '| absolute | 1,234,567 | 30 | 6.0000 | 6.5000 | 0.2500 | 0.0310 | 12 | - |' in md
  assert '| tisa+convq | 1,000 | 30 | 5.5000 | 6.0000 | 0.2500 | - | 9 | 0.8000 |' in md
  with open(tmp_path / 'results.csv') as f:
    got = list(csv.DictReader(f))
  assert [r['variant'] for r in got] == ['absolute', 'tisa+convq']
  assert got[1]['glue_sst2'] == '0.8' and got[1]['tau_layer0'] == ''
  from posjax.analysis import plots
  path = plots.loss_curves({'absolute': compare.read_metrics(str(tmp_path / 'absolute')), 'tisa+convq': m},
                           str(tmp_path / 'loss_curves.png'))
  assert os.path.getsize(path) > 5000


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
  """Two micro variants, a few steps, through the command line: workdirs, tables, plot, one vocabulary."""
  assert compare.main(['--variants', 'absolute,t5', '--size', 'micro', '--steps', '4', '--out',
                       str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert '| absolute |' in out and '| t5 |' in out
  assert (tmp_path / 'loss_curves.png').stat().st_size > 5000
  assert (tmp_path / 't5' / 'tokenizer.json').read_text() == (tmp_path / 'absolute' / 'tokenizer.json').read_text()
  with open(tmp_path / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert float(rows[1]['tau_layer0']) == pytest.approx(1.0)  # T5's positional attention is Toeplitz
  assert float(rows[0]['eval_loss']) < 8.0
  from posjax.data import corpus
  assert corpus.load(str(tmp_path / 'default_corpus.jsonl.gz')).documents == corpus.default_corpus().documents


@pytest.mark.slow
def test_cli_with_extrapolation_and_sst2_columns(tmp_path, capsys, shared_data):
  """The papers' table shape: pretraining loss, loss at 2x the training length, SST-2 dev accuracy."""
  assert compare.main(['--variants', 'absolute,alibi', '--size', 'micro', '--steps', '20', '--extrapolate', '2',
                       '--glue', 'sst2', '--glue_dir', os.path.join(shared_data, 'sst2'),
                       '--glue_set', 'num_train_steps=20', '--glue_set', 'data.seq_len=32',
                       '--glue_set', 'data.max_train_examples=640', '--out', str(tmp_path)]) == 0
  with open(tmp_path / 'results.csv') as f:
    rows = {r['variant']: r for r in csv.DictReader(f)}
  assert float(rows['alibi']['extrapolation_x2_loss']) > 0
  assert 30 < float(rows['alibi']['sst2_score']) <= 100  # accuracy in percent, as GLUE reports it
  assert float(rows['absolute']['extrapolation_x1_loss']) > 0
  assert 'extrapolation_x2_loss' in capsys.readouterr().out
