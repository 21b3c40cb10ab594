"""Fine-tuning runs through the pretraining trainer, so on the mesh too: SST-2-shaped data fine-tuned on 8 CPU
devices with data=2, fsdp=2, tensor=2 gives the one-device run's dev metrics and logits, and a SIGKILLed
sharded fine-tuning resumes bitwise equal to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys

import numpy as np

from helpers import ROOT, xla_flags
from test_glue import tiny_hf_bert, toy_sst2
from test_preemption import env_with_cache, final_state, finalised_steps, flat, run_until

STEPS = 40
MESH = ['--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2']
EIGHT = {'XLA_FLAGS': xla_flags(8)}
# Sharded reductions add in another order than one device's: after 40 Adam steps the parameters differ by
# float32 rounding, which the logits show at the 1e-5 level; 1e-4 leaves margin and is far below any change
# a real difference (a missing all-reduce, a wrong shard) makes, which moves logits by 1e-2 and more.
LOGIT_TOL = 1e-4


def finetune_cmd(workdir, hf_dir, data_dir, extra=()):
  return [sys.executable, os.path.join(ROOT, 'train.py'), f'--workdir={workdir}', '--config=configs/glue.py:sst2',
          f'--config.init_from={hf_dir}', f'--config.data.dir={data_dir}', f'--config.num_train_steps={STEPS}',
          '--config.data.seq_len=16', '--config.batch_size=16', '--config.learning_rate=1e-3',
          '--config.hidden_dropout=0.1', '--config.log_every=1', '--config.checkpoint_every=10', *extra]


def dev_logits(workdir, hf_dir, data_dir):
  """The classifier's logits on the dev set from the run's final parameters, on this process's one device."""
  import jax  # pylint: disable=g-import-not-at-top
  from posjax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from posjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from posjax.finetune import data as data_lib  # pylint: disable=g-import-not-at-top
  from posjax.finetune import tasks  # pylint: disable=g-import-not-at-top
  from posjax.finetune.model import Classifier  # pylint: disable=g-import-not-at-top
  meta = json.load(open(os.path.join(workdir, 'checkpoints', str(STEPS), 'meta', 'metadata')))
  model = {k: v for k, v in meta['model'].items() if k not in ('task', 'num_labels')}
  task = tasks.get('sst2')
  dev = data_lib.read(task, task.dev[0][1], 'tsv', data_dir)
  arrays = data_lib.encode(tokenizer_lib.load(os.path.join(hf_dir, 'vocab.txt')), dev, 16)
  params = final_state(workdir, STEPS)['params']
  return np.asarray(jax.jit(Classifier(ModelConfig.from_dict(model), 2).apply)(
      {'params': params}, arrays['ids'], arrays['mask'], arrays['type_ids']))


def test_sharded_finetuning_matches_one_device_and_resumes_bitwise(tmp_path):
  hf_dir = tiny_hf_bert(tmp_path / 'hf', vocab_size=128)  # the vocab axis splits over tensor=2
  data_dir = toy_sst2(tmp_path / 'SST-2')
  env = env_with_cache(tmp_path / 'cache')
  one, mesh, killed = tmp_path / 'one', tmp_path / 'mesh', tmp_path / 'killed'
  for workdir, extra, env_extra in ((one, (), {}), (mesh, MESH, EIGHT)):
    out = subprocess.run(finetune_cmd(workdir, hf_dir, data_dir, extra), cwd=ROOT, env={**env, **env_extra},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
  results = [json.load(open(w / 'results.json')) for w in (one, mesh)]
  assert results[0]['dev'] == results[1]['dev'], results
  a, b = dev_logits(one, hf_dir, data_dir), dev_logits(mesh, hf_dir, data_dir)
  print(f'dev accuracy {results[0]["dev"]["accuracy"]:.1f} on both; logits: max |1 device - 8 devices| '
        f'{np.abs(a - b).max():.2e}')
  np.testing.assert_allclose(b, a, atol=LOGIT_TOL, rtol=0)

  cmd = finetune_cmd(killed, hf_dir, data_dir, MESH)
  code, _ = run_until(cmd, {**env, **EIGHT}, killed, 23, signal.SIGKILL, after_a_checkpoint=True)
  saved = max(finalised_steps(killed))
  assert code == -signal.SIGKILL and saved < STEPS
  out = subprocess.run(cmd, cwd=ROOT, env={**env, **EIGHT}, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resumed from the checkpoint at step {saved}' in out.stderr
  x, y = flat(final_state(mesh, STEPS)), flat(final_state(killed, STEPS))
  assert x.keys() == y.keys()
  assert not [k for k in x if x[k].tobytes() != y[k].tobytes()]
