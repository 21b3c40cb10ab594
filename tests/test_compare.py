"""posjax.compare: its configs are posjax/configs/bert.py's with the run length and seeds set, its tables (means,
spreads, differences in units of the seed spread) come from the runs, bad arguments stop before any training,
finished runs are reused with their own training time, a stop is one line and exit 0 and the rerun resumes;
a tiny version of the reproduce preset runs end to end (micro, one variant, two seeds, a toy SST-2). The real
reproduce run and a real SIGTERM are `slow`."""

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, load_config_module
from posjax import compare
from test_glue import toy_sst2


def test_config_is_configs_bert_with_the_run_length_and_seeds():
  bert = load_config_module('bert')
  ours = compare.make_config('mini', 'tisa+convq', 1000, seed=3, data_seed=5)
  theirs = bert.get_config('mini,tisa+convq')
  assert ours.model.to_dict() == theirs.model.to_dict()
  assert (ours.objective, ours.learning_rate) == (theirs.objective, theirs.learning_rate)
  assert {**ours.data.to_dict(), 'seed': 0} == theirs.data.to_dict()
  assert (ours.seed, ours.data.seed, ours.num_train_steps, ours.eval_every, ours.checkpoint_every) == (
      3, 5, 1000, 1000, 1000)
  c = compare.make_config('tiny', 'absolute', 10, overrides={'data.seq_len': 64, 'batch_size': 8, 'data.seed': 2})
  assert (c.data.seq_len, c.batch_size, c.data.seed) == (64, 8, 2)


def test_reproduce_preset_is_the_papers_variants_and_every_one_builds():
  """Absolute, TISA and Chang et al.'s composite attention without absolute positions, ConvBERT's mixed
  attention with them (as ConvBERT's models), three seeds, SST-2 fine-tuning."""
  from posjax.training import pretraining
  p = compare.PRESETS['reproduce']
  assert p['variants'].split(',') == ['absolute', 'tisa', 'convfixed+convq+convk', 'absolute+convbert']
  assert (p['seeds'], p['glue']) == ('0,1,2', 'sst2')
  assert [(b, v) for b, v, _ in p['claims']] == [('absolute', v) for v in p['variants'].split(',')[1:]]
  for v in p['variants'].split(','):
    c = compare.make_config(p['size'], v, p['steps'], overrides=compare._with_data(p['overrides'], '/d'))
    assert c.data.files == '/d/imdb/imdb_unsup.jsonl.gz'
    pretraining.validate(c)


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
    (['--variants', 'tisa', '--glue', 'sst2', '--glue_dir', '/nonexistent'], "--glue_dir '/nonexistent': no"),
    (['--variants', 'tisa', '--seeds', '0,x'], "--seeds '0,x' must be comma-separated integers"),
    (['--variants', 'tisa', '--seeds', '1,1'], 'must name distinct integers'),
    (['--variants', 'tisa', '--data_seed', 'all'], "--data_seed 'all' must be an integer"),
    (['--preset', 'reproduce', '--data', '/nonexistent'], "--preset reproduce reads its corpora from --data"),
])
def test_bad_arguments_stop_before_training(tmp_path, capsys, argv, message):
  assert compare.main(argv + ['--out', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err
  assert not (tmp_path / 'o').exists()


def _fake_run(workdir, losses, eval_loss):
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i, loss in enumerate(losses):
      f.write(json.dumps({'step': 10 * (i + 1), 'time': 0.0, 'loss': loss, 'accuracy': 0.1}) + '\n')
    f.write(json.dumps({'step': 10 * len(losses), 'time': 0.0, 'eval_loss': eval_loss,
                        'eval_accuracy': 0.25}) + '\n')


def _row(variant, seed, eval_loss, score, **more):
  return {'variant': variant, 'seed': seed, 'data_seed': 0, 'parameters': 1000, 'steps': 30,
          'eval_loss': eval_loss, 'tau_layer0': None, 'seconds': 10.0 + seed, 'sst2_score': score,
          'sst2_predictions': None, **more}


def test_table_of_means_spreads_and_differences_beyond_the_seed_spread(tmp_path):
  """mean, sample std and range per variant; the difference of the means in pooled seed std sqrt((s1^2 +
  s2^2) / 2), starred beyond 2 of them: here eval_loss differs by 6 sigma, sst2_score by 0.5 sigma."""
  rows = [_row('absolute', 0, 6.0, 80.0), _row('absolute', 1, 6.1, 78.0), _row('absolute', 2, 6.2, 82.0),
          _row('tisa', 0, 5.4, 81.0), _row('tisa', 1, 5.5, 79.0), _row('tisa', 2, 5.6, 83.0, sst2_predictions='p')]
  cols, summary = compare.summarise(rows)
  assert cols == ['eval_loss', 'seconds', 'sst2_score']  # tau is None everywhere, the rest describe runs
  a, t = summary
  assert a['eval_loss_mean'] == pytest.approx(6.1) and a['eval_loss_std'] == pytest.approx(0.1)
  assert (a['eval_loss_min'], a['eval_loss_max'], a['parameters'], a['seeds']) == (6.0, 6.2, 1000, 3)
  assert t['eval_loss_delta'] == pytest.approx(-0.6) and t['eval_loss_sigmas'] == pytest.approx(-6.0)
  assert t['eval_loss_beyond_spread'] and not t['sst2_score_beyond_spread']
  assert t['sst2_score_sigmas'] == pytest.approx(0.5)
  assert 'eval_loss_delta' not in a
  compare.write_tables(rows, str(tmp_path), 'tiny, 30 steps')
  md = (tmp_path / 'results.md').read_text()
  assert '| absolute | 3 | 1,000 | 6.1000 ± 0.1000 [6.0000, 6.2000] | 11 ± 1 [10, 12] | 80.00 ± 2.00 [78.00, 82.00] |' in md
  assert '| tisa | -0.6000 (-6.0σ) * | +0 (+0.0σ) | +1.00 (+0.5σ) |' in md
  assert '| tisa | 2 | 0 | 1,000 | 30 | - | 5.6000 | - | - | 12 | 83.00 | p |' in md  # every run, in runs order
  assert 'Claim by claim' not in md  # none given
  with open(tmp_path / 'results.csv') as f:
    got = list(csv.DictReader(f))
  assert [r['variant'] for r in got] == ['absolute', 'tisa']
  assert float(got[1]['eval_loss_sigmas']) == pytest.approx(-6.0) and got[1]['eval_loss_beyond_spread'] == 'True'
  with open(tmp_path / 'runs.csv') as f:
    assert len(list(csv.DictReader(f))) == 6


def test_claims_state_direction_and_spread_against_their_own_baseline(tmp_path):
  """Each claim whose two variants ran gets a line: MLM loss (lower is better) and each fine-tuning score
  (higher is better), against the claim's baseline (not the table's first variant); one-seed variants say so."""
  rows = [_row('tisa', 0, 5.4, 81.0), _row('tisa', 1, 5.5, 79.0), _row('tisa', 2, 5.6, 83.0),
          _row('absolute', 0, 6.0, 80.0), _row('absolute', 1, 6.1, 78.0), _row('absolute', 2, 6.2, 82.0),
          _row('alibi', 0, 6.3, 70.0)]
  claims = [('absolute', 'tisa', 'TISA beats absolute.'), ('absolute', 'alibi', 'ALiBi beats absolute.'),
            ('absolute', 'rope', 'never ran.')]
  compare.write_tables(rows, str(tmp_path), 'x', claims)
  md = (tmp_path / 'results.md').read_text()
  assert ('- **TISA beats absolute.** (tisa against absolute) held-out MLM loss 5.5000 vs 6.1000 (Δ -0.6000, '
          'in the claimed direction, 6.0σ, beyond the seed spread); sst2 dev score 81.00 vs 80.00 (Δ +1.00, in '
          'the claimed direction, 0.5σ, within the seed spread).') in md
  assert ('- **ALiBi beats absolute.** (alibi against absolute) held-out MLM loss 6.3000 vs 6.1000 (Δ +0.2000, '
          'against the claimed direction, one seed, no spread); sst2 dev score 70.00 vs 80.00 (Δ -10.00, against '
          'the claimed direction, one seed, no spread).') in md
  assert 'never ran' not in md and md.index('Claim by claim:') < md.index('Difference of the means to tisa')


def test_one_seed_has_no_spread_and_no_mark(tmp_path):
  rows = [_row('absolute', 0, 6.0, 80.0), _row('tisa', 0, 5.0, 80.0)]
  _, (_, t) = compare.summarise(rows)
  assert t['eval_loss_std'] is None and 'eval_loss_sigmas' not in t and t['eval_loss_delta'] == -1.0
  compare.write_tables(rows, str(tmp_path), 'x')
  assert '| tisa | 1 | 1,000 | 5.0000 |' in (tmp_path / 'results.md').read_text()


def test_loss_curves_over_seeds(tmp_path):
  _fake_run(tmp_path / 'a0', [9.0, 7.0, 6.0], 6.5)
  _fake_run(tmp_path / 'a1', [9.2, 7.2, 6.4], 6.7)
  m = compare.read_metrics(str(tmp_path / 'a1'))
  assert (m['step'], m['loss'], m['eval_step'], m['eval_loss']) == ([10, 20, 30], [9.2, 7.2, 6.4], [30], [6.7])
  assert compare.workdir_name('tisa+convq') == 'tisa-convq'
  assert compare.run_dir('o', 'tisa+convq', 2) == os.path.join('o', 'tisa-convq', 'seed2')
  from posjax.analysis import plots
  steps, mean, lo, hi = plots._over_seeds([compare.read_metrics(str(tmp_path / d)) for d in ('a0', 'a1')],
                                          'step', 'loss')
  assert steps == [10, 20, 30] and np.allclose(mean, [9.1, 7.1, 6.2]) and np.allclose(hi - lo, [0.2, 0.2, 0.4])
  path = plots.loss_curves({'absolute': [compare.read_metrics(str(tmp_path / d)) for d in ('a0', 'a1')],
                            'one': m}, str(tmp_path / 'loss_curves.png'))
  assert os.path.getsize(path) > 5000


def test_finished_runs_are_reused_with_their_own_time_and_stopped_ones_add_up(tmp_path):
  from posjax.training import trainer
  config = compare.make_config('micro', 'absolute', 2)
  wd = str(tmp_path / 'run')
  os.makedirs(wd)
  calls = []

  def stopped():
    calls.append('stopped')
    time.sleep(0.2)
    raise trainer.Stopped('SIGTERM received')

  def finishes():
    calls.append('trained')
    time.sleep(0.1)

  with pytest.raises(trainer.Stopped):
    compare.timed(wd, config, stopped)
  first = json.load(open(os.path.join(wd, 'compare.json')))
  assert not first['finished'] and first['seconds'] >= 0.2
  seconds, reused = compare.timed(wd, config, finishes)
  assert not reused and seconds >= first['seconds'] + 0.1
  assert compare.timed(wd, config, finishes) == (seconds, True)  # nothing run, the original time
  config.data.tokenizer = '/elsewhere/tokenizer.json'  # where the shared vocabulary lies is not the run
  assert compare.timed(wd, config, finishes) == (seconds, True)
  config.num_train_steps = 3  # a longer run continues and adds its time
  assert compare.timed(wd, config, finishes)[0] > seconds
  assert calls == ['stopped', 'trained', 'trained']


def _tiny_data(root):
  """The reproduce preset's data layout, in miniature: imdb/imdb_unsup.jsonl.gz and sst2/ (a toy SST-2)."""
  rng = np.random.default_rng(0)
  words = [''.join(rng.choice(list('abcdefghijklmnop'), 4)) for _ in range(400)]
  os.makedirs(root / 'imdb')
  with gzip.open(root / 'imdb' / 'imdb_unsup.jsonl.gz', 'wt') as f:
    for _ in range(200):
      f.write(json.dumps({'text': ' '.join(rng.choice(words, 80)), 'label': -1}) + '\n')
  toy_sst2(root / 'sst2')
  return str(root)


TINY = ['--size', 'micro', '--steps', '2', '--variants', 'absolute', '--seeds', '0,1',
        '--glue_set', 'num_train_steps=2', '--glue_set', 'data.seq_len=16', '--glue_set', 'log_every=1']


def test_tiny_reproduce_stops_cleanly_resumes_and_reuses(tmp_path, capsys, monkeypatch):
  """The reproduce preset at micro size, one variant, two seeds: a stop in the second fine-tuning ends the
  comparison with one line and status 0; the rerun reuses the first run (its own training time) and
  finishes the second; one corpus and one vocabulary serve both seeds; each fine-tuning has its run's seed."""
  from posjax.finetune import finetuning
  from posjax.training import trainer
  data, out = _tiny_data(tmp_path / 'data'), tmp_path / 'out'
  real = finetuning.finetune_and_evaluate

  def stop_in_seed1(config, workdir):
    if config.seed == 1:
      raise trainer.Stopped('SIGTERM received: wrote the checkpoint at step 1 and stopped')
    return real(config, workdir)

  monkeypatch.setattr(finetuning, 'finetune_and_evaluate', stop_in_seed1)
  assert compare.main(['--preset', 'reproduce', '--data', data, '--out', str(out)] + TINY) == 0
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  assert [l for l in err.splitlines() if 'stopped' in l] == [
      '[compare] stopped: SIGTERM received: wrote the checkpoint at step 1 and stopped; the finished runs are '
      'kept']
  first = json.load(open(out / 'absolute' / 'seed0' / 'compare.json'))
  monkeypatch.setattr(finetuning, 'finetune_and_evaluate', real)
  assert compare.main(['--preset', 'reproduce', '--data', data, '--out', str(out)] + TINY) == 0
  captured = capsys.readouterr()
  assert 'run 1/2: absolute, seed 0: held-out MLM loss' in captured.err and '(reused; trained in' in captured.err
  with open(out / 'runs.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['variant'], r['seed'], r['data_seed']) for r in rows] == [('absolute', '0', '0'), ('absolute', '1', '0')]
  assert float(rows[0]['seconds']) == round(first['seconds'], 1)  # the original time, not the reuse
  assert rows[0]['eval_loss'] != rows[1]['eval_loss']  # the model seeds differ
  assert all(30 <= float(r['sst2_score']) <= 100 and r['sst2_predictions'].endswith('SST-2.tsv') for r in rows)
  assert '| absolute | 2 | ' in captured.out and ' ± ' in captured.out
  assert len([p for p in (out / 'data' / 'posjax_pieces').iterdir() if p.is_dir()]) == 1
  assert len(list((out / 'data' / 'local_corpus').iterdir())) == 1
  tokenizers = {(out / 'absolute' / f'seed{s}' / 'tokenizer.json').read_text() for s in (0, 1)}
  assert len(tokenizers) == 1
  for s in (0, 1):
    ft = json.load(open(out / 'absolute' / f'seed{s}' / 'finetune_sst2' / 'config.json'))
    assert (ft['seed'], ft['data']['seed'], ft['num_train_steps']) == (s, 0, 2)


@pytest.mark.slow
def test_a_real_sigterm_in_fine_tuning_stops_the_comparison_in_one_line(tmp_path):
  """SIGTERM to `python -m posjax.compare` while it fine-tunes: status 0, one line, no traceback; the same
  command then finishes from the checkpoint."""
  data = str(tmp_path / 'sst2')
  toy_sst2(data)
  argv = [sys.executable, '-m', 'posjax.compare', '--variants', 'absolute', '--size', 'micro', '--steps', '2',
          '--glue', 'sst2', '--glue_dir', data, '--glue_set', 'num_train_steps=400000', '--glue_set',
          'log_every=20', '--glue_set', 'data.seq_len=16', '--out', str(tmp_path / 'out')]
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in p.stderr:
    lines.append(line)
    if 'step 20/400000' in line:
      p.send_signal(signal.SIGTERM)
      break
  _, rest = p.communicate(timeout=300)
  err = ''.join(lines) + rest
  assert p.returncode == 0, err[-3000:]
  assert 'Traceback' not in err and err.count('[compare] stopped: SIGTERM received') == 1
  done = subprocess.run(argv[:-5] + ['--glue_set', 'num_train_steps=40', '--out', str(tmp_path / 'out')],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'resumed from the checkpoint at step' in done.stderr and '| absolute | 1 |' in done.stdout


@pytest.mark.slow
def test_cli_with_extrapolation_and_sst2_columns(tmp_path, capsys, shared_data):
  """The papers' table shape: pretraining loss, loss at 2x the training length, SST-2 dev accuracy."""
  assert compare.main(['--variants', 'absolute,alibi', '--size', 'micro', '--steps', '20', '--extrapolate', '2',
                       '--glue', 'sst2', '--glue_dir', os.path.join(shared_data, 'sst2'),
                       '--glue_set', 'num_train_steps=20', '--glue_set', 'data.seq_len=32',
                       '--glue_set', 'data.max_train_examples=640', '--out', str(tmp_path)]) == 0
  with open(tmp_path / 'runs.csv') as f:
    rows = {r['variant']: r for r in csv.DictReader(f)}
  assert float(rows['alibi']['extrapolation_x2_loss']) > 0
  assert 30 < float(rows['alibi']['sst2_score']) <= 100  # accuracy in percent, as GLUE reports it
  assert float(rows['absolute']['extrapolation_x1_loss']) > 0
  assert 'extrapolation_x2_loss' in capsys.readouterr().out


@pytest.mark.slow
def test_reproduce(tmp_path, shared_data):
  """The README's evidence: `posjax compare --preset reproduce` for real (about an hour on 2 CPU cores).
  Every run learns (held-out MLM loss well under the unigram level, SST-2 well over the majority class's
  50.9%) and the tables have every variant with three seeds."""
  assert compare.main(['--preset', 'reproduce', '--data', shared_data, '--out', str(tmp_path)]) == 0
  with open(tmp_path / 'runs.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 12
  assert all(float(r['eval_loss']) < 6.5 and float(r['sst2_score']) > 65 for r in rows), rows
  with open(tmp_path / 'results.csv') as f:
    summary = list(csv.DictReader(f))
  assert [s['seeds'] for s in summary] == ['3'] * 4
