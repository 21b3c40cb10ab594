"""Hostile inputs and leftovers: bounded memory on a huge line or paragraph, caches keyed on what was read,
damaged caches and datasets named in one line or remade, a full disk named with its space, leftovers of
killed preparations cleared, readers that fall back without tracebacks."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT
from posjax.data import corpus, pieces
from posjax.errors import ConfigError
from test_errors import BERT, SMALL, files, run_cli  # noqa: F401  (files: the shared inputs fixture)

PEAK_RSS = '''
import collections, resource, sys
from posjax.data import corpus
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
skipped = collections.Counter()
docs = list(corpus.iter_documents([sys.argv[1]], 'text', skipped))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - before) // 1024, len(docs), max(map(len, docs)), dict(skipped))
'''


@pytest.mark.parametrize('kind', ['one huge line (.gz)', 'one huge paragraph', 'one huge JSON line'])
def test_reading_is_bounded_by_the_cut_not_by_the_line(tmp_path, kind):
  """300 MB of text in one line (or one paragraph without a blank line): the reader's peak memory stays a few
  MB above its start, the document is cut at MAX_DOC_CHARS, and what follows is still read."""
  path = tmp_path / {'one huge line (.gz)': 'big.txt.gz', 'one huge paragraph': 'big.txt',
                     'one huge JSON line': 'big.jsonl'}[kind]
  after = 'A normal document after the big one, long enough to be kept by the reader.'
  chunk = 'word ' * 200_000  # 1 MB
  if kind == 'one huge JSON line':
    with open(path, 'w') as f:
      f.write('{"text": "' + chunk * 20 + '"}\n' + json.dumps({'text': after}) + '\n')
  else:
    opener = gzip.open(path, 'wt', compresslevel=1) if kind.endswith('(.gz)') else open(path, 'w')
    with opener as f:
      for _ in range(300):
        f.write(chunk + ('' if kind.startswith('one huge line') else '\n'))
      f.write('\n\n' + after + '\n')
  out = subprocess.run([sys.executable, '-c', PEAK_RSS, str(path)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': ROOT}, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  grown_mb, n, longest, skipped = out.stdout.split(' ', 3)
  print(f'{kind}: peak memory +{grown_mb} MB; {n} documents, longest {longest} characters; {skipped}')
  assert int(grown_mb) < 64
  if kind == 'one huge JSON line':  # over 16 MiB: skipped, counted
    assert int(n) == 1 and 'records over 16 MiB (skipped)' in skipped
  else:
    assert int(n) == 2 and int(longest) == corpus.MAX_DOC_CHARS


def test_the_cache_key_holds_the_file_format(tmp_path):
  from posjax.data import sources
  text = ''.join(json.dumps({'text': f'document number {i} with enough words to be kept'}) + '\n' for i in range(30))
  (tmp_path / 'a.jsonl').write_text(text)
  (tmp_path / 'a.txt').write_text(text)
  assert sources._content_name([str(tmp_path / 'a.jsonl')], 'text') != sources._content_name(
      [str(tmp_path / 'a.txt')], 'text')


def test_token_ids_past_the_vocabulary_are_caught_when_the_pieces_are_opened(tmp_path):
  from posjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  docs = [f'the cat sat on the mat number {i} and then it ran under the log again' for i in range(200)]
  tok = tokenizer.train_wordpiece(docs, 200)

  class Docs:
    skipped = {}

    def __len__(self):
      return len(docs)

    def texts(self, idx, skipped):
      return [(int(i), docs[i]) for i in idx]
  d = str(tmp_path / 'p')
  pieces.prepare(Docs(), np.zeros(len(docs), bool), tok, 14, d)
  assert len(pieces.Pieces(d, 'train', tok.get_vocab_size()))
  tokens = np.memmap(os.path.join(d, 'train.tokens'), np.uint16, 'r+')
  tokens[5] = 60000
  tokens.flush()
  with pytest.raises(ConfigError, match=r'train.tokens holds id 60000 at position 5, outside the vocabulary'):
    pieces.Pieces(d, 'train', tok.get_vocab_size())


def test_damaged_and_leftover_caches(files, tmp_path, capsys, caplog):
  """Pieces whose meta.json is gone are made again (they were an OSError); a truncated prepared dataset is one
  line naming its directory; `.tmp-*` and `incomplete.*` leftovers of killed runs are cleared; a run asked for
  fewer steps than its checkpoint holds says so."""
  data_dir = tmp_path / 'tfds'
  args = [a.format(d=files) for a in [BERT, *SMALL]] + [f'--config.data.data_dir={data_dir}']
  code, err = run_cli(args, tmp_path / 'w1', capsys)
  assert code == 0, err[-2000:]
  [table] = [p for p in (data_dir / 'posjax_pieces').iterdir() if p.is_dir()]
  os.remove(table / 'meta.json')
  leftover = data_dir / 'posjax_pieces' / f'{table.name}.tmp-killed'
  leftover.mkdir()
  [version] = list((data_dir / 'local_corpus').glob('*/1.0.0'))
  stale = version.parent / 'incomplete.ABC_1.0.0'
  stale.mkdir()
  code, err = run_cli(args, tmp_path / 'w2', capsys)
  assert code == 0 and 'Traceback' not in err, err[-2000:]
  assert (table / 'meta.json').exists() and not leftover.exists() and 'making them again' in caplog.text
  code, err = run_cli(args + ['--config.num_train_steps=1'], tmp_path / 'w2', capsys)  # done already
  assert code == 0 and 'nothing left to train' in caplog.text, err[-2000:]
  # The stale tfds directory goes when a preparation of that dataset takes the lock.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(version)
  code, err = run_cli(args, tmp_path / 'w3', capsys)
  assert code == 0 and not stale.exists(), err[-2000:]
  record_file = next(version.glob('*.array_record*'))
  with open(record_file, 'r+b') as f:
    f.truncate(os.path.getsize(record_file) // 2)
  shutil.rmtree(table)
  code, err = run_cli(args, tmp_path / 'w4', capsys)
  assert code == 2 and 'Traceback' not in err
  assert f'a prepared file is damaged' in err and str(version) in err.strip().splitlines()[-1], err[-2000:]


def test_a_full_disk_is_one_line_with_the_path_and_the_space(files, tmp_path):
  mount = tmp_path / 'small'
  mount.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=200k', 'tmpfs', str(mount)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a small tmpfs here (needs root)')
  try:
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *[a.format(d=files) for a in [BERT, *SMALL]],
           f'--workdir={mount / "w"}', f'--config.data.data_dir={tmp_path / "tfds"}', '--config.num_train_steps=20',
           '--config.checkpoint_every=10', '--config.model.hidden_size=32', '--config.model.num_heads=2',
           '--config.model.intermediate_size=64', '--config.model.num_layers=1']
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
  finally:
    subprocess.run(['umount', str(mount)])
  assert out.returncode == 4, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {mount / "w" / "checkpoints"}: no space for the next checkpoint: it needs '
                         'about '), last
  assert 'free' in last


def test_prepare_cli_errors_are_one_line(tmp_path):
  for args, message in [(['--files=/nonexistent/*.txt'], "data.files: '/nonexistent/*.txt' matches no file"),
                        (['--tfds_name=no_such_dataset'], "--tfds_name: 'no_such_dataset': Dataset no_such_dataset"),
                        ([], 'give exactly one of --files and --tfds_name')]:
    out = subprocess.run([sys.executable, '-m', 'posjax.data.prepare', f'--data_dir={tmp_path}', *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, 'PYTHONPATH': ROOT})
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f'error: {message}'), out.stderr[-500:]


def test_readers_fall_back_from_a_truncated_latest_checkpoint_without_tracebacks(tmp_path):
  """`python -m posjax.analysis` and length extrapolation on a workdir whose latest checkpoint is truncated:
  the previous one is read, with one warning naming the damaged one, and no traceback (orbax's asyncio
  tasks used to print one per failed read)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from posjax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from posjax.convert import hf  # pylint: disable=g-import-not-at-top
  from posjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from posjax.models import Bert  # pylint: disable=g-import-not-at-top
  from posjax.training import checkpoint, steps  # pylint: disable=g-import-not-at-top
  from test_checkpoint import truncate  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = 'the a cat dog sat ran on under mat log and then it was big small'.split()
  docs = [' '.join(rng.choice(words, 60)) for _ in range(40)]
  (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  work = tmp_path / 'run'
  tok = tokenizer_lib.train_wordpiece(docs, 100)
  tokenizer_lib.save(tok, str(work))
  cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_position_embeddings=64, attention='t5')
  meta = {'model': {**cfg.to_dict(), 'objective': 'mlm'},
          'config': {'seed': 0, 'data': {'files': str(tmp_path / 'docs.jsonl'), 'text_field': 'text',
                                         'seq_len': 16, 'eval_fraction': 0.5}}}
  mngr = checkpoint.manager(str(work), 3)
  for step in (1, 2):
    params = hf.init_params(Bert(dataclasses.replace(cfg)), seed=step)
    checkpoint.save(mngr, step, steps.TrainState(
        step=jnp.array(step), params=params, opt_state=jnp.zeros(()), rng=jax.random.PRNGKey(0),
        skipped=jnp.array(0), first_bad_step=jnp.array(-1)), meta)
  mngr.wait_until_finished()
  mngr.close()
  truncate(str(work))
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'TFDS_DATA_DIR': str(tmp_path / 'tfds')}
  for cmd in (['-m', 'posjax.analysis', f'--checkpoint={work}', f'--out={tmp_path / "figs"}', '--length=16'],
              ['-m', 'posjax.analysis.extrapolation', str(work), '--multiples=1', '--max_tokens=64']):
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and 'Traceback' not in out.stderr, out.stderr[-3000:]
    assert 'checkpoint at step 2 in' in out.stderr and 'unreadable' in out.stderr, out.stderr[-3000:]


def test_no_tpu_probe_notices_on_a_machine_without_a_tpu(tmp_path):
  """With libtpu installed (the test extra brings it) and JAX_PLATFORMS unset, `train.py` on a machine with
  no TPU says nothing about TPUs: `import posjax` imports jax before the CLI picks the platforms, so the
  choice must reach jax's config, not only the environment."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu is not installed: jax does not probe for a TPU')
  if os.path.exists('/dev/accel0') or os.path.isdir('/dev/vfio'):
    pytest.skip('this machine may have a TPU')
  doc = 'the cat {} sat on the mat and ran under the log, then it slept'
  (tmp_path / 'corpus.txt').write_text('\n\n'.join(doc.format(i) for i in range(60)))
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  env.update(PYTHONPATH=ROOT, TFDS_DATA_DIR=str(tmp_path / 'tfds'))
  args = [a.format(d=tmp_path) for a in SMALL]
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), BERT, f'--workdir={tmp_path / "w"}', *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'TPU' not in out.stderr and 'libtpu' not in out.stderr, out.stderr[-3000:]
  # The other programs (`python -m posjax.X`) too: analysis runs the model on the trained checkpoint.
  out = subprocess.run([sys.executable, '-m', 'posjax.analysis', f'--checkpoint={tmp_path / "w"}',
                        f'--out={tmp_path / "a"}', '--length=8'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'TPU' not in out.stderr and 'libtpu' not in out.stderr, out.stderr[-3000:]


def test_every_program_picks_the_platforms_before_jax_starts():
  """Each `python -m posjax...` program's entry calls cli.quiet_tpu_probe (the `posjax` command does it for
  its subcommands); aot puts JAX on the CPU."""
  programs = []
  for dirpath, _, names in os.walk(os.path.join(ROOT, 'posjax')):
    for name in names:
      path = os.path.join(dirpath, name)
      if name.endswith('.py') and "if __name__ == '__main__':" in open(path).read():
        programs.append(os.path.relpath(path, ROOT))
  assert len(programs) >= 7, programs
  for path in programs:
    entry = open(os.path.join(ROOT, path)).read().split("if __name__ == '__main__':", 1)[1]
    if path in ('posjax/cli.py', 'posjax/attention/table.py'):  # the CLI calls it per command; table: no jax run
      continue
    if path == 'posjax/aot/__main__.py':  # a compile: JAX on the CPU whatever the machine has
      assert 'cli.host_on_cpu()' in entry, path
      continue
    assert 'cli.quiet_tpu_probe()' in entry, path
