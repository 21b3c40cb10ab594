"""Two processes of 4 CPU devices joined by jax.distributed train like one process of 8 devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(tmp_path, name, n, i, port, local, tokenizer):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR'))}
  return subprocess.Popen(
      [sys.executable, os.path.join(HERE, 'distributed_worker.py'), str(n), str(i), str(port), str(local),
       str(tmp_path / name), str(tmp_path / f'{name}.json'), tokenizer],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc):
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-4000:]


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_of_eight(tmp_path):
  # One vocabulary for both runs: WordPiece training differs from run to run.
  from posjax.data import corpus, tokenizer
  tokenizer.save(tokenizer.train_wordpiece(corpus.load('', 'text').documents[:300], 300), str(tmp_path))
  tok = str(tmp_path / 'tokenizer.json')
  port = _free_port()
  pair = [_start(tmp_path, 'two', 2, i, port, 4, tok) for i in range(2)]
  one = _start(tmp_path, 'one', 1, 0, 0, 8, tok)
  try:
    for p in pair + [one]:
      _finish(p)
  finally:
    for p in pair + [one]:
      if p.poll() is None:
        p.kill()
  two, single = (json.loads((tmp_path / f'{n}.json').read_text()) for n in ('two', 'one'))
  assert (two['process_count'], two['device_count']) == (2, 8)
  assert (single['process_count'], single['device_count']) == (1, 8)
  print(f"2x4 vs 1x8 devices: loss {two['loss']:.7f} vs {single['loss']:.7f}, eval_loss "
        f"{two['eval_loss']:.7f} vs {single['eval_loss']:.7f}")
  for k in ('loss', 'eval_loss', 'grad_norm'):
    assert two[k] == pytest.approx(single[k], rel=1e-5, abs=1e-6), k
  assert two['checkpoints'] == single['checkpoints'] == [3]
