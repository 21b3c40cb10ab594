"""Run in a process with 8 CPU devices by tests/test_sharding.py: one train step of a model under several
meshes, written to an .npz for the test to compare with the single-device result."""

import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import load_config_module  # noqa: E402
from posjax.aot import hlo  # noqa: E402
from posjax.data import pipeline, pretrain  # noqa: E402
from posjax.training import objectives, optimizer, pretraining, sharding, trainer  # noqa: E402

MESHES = {'single': (1, 1, 1), 'data': (8, 1, 1), 'fsdp': (1, 8, 1), 'tensor': (2, 1, 4), 'mix': (2, 2, 2)}


def config(name, variant):
  c = load_config_module(name).get_config(f'tiny,{variant}')
  c.model.update(vocab_size=128, hidden_size=64, num_heads=8, intermediate_size=128, num_layers=2,
                 hidden_dropout=0.0, attention_dropout=0.0)
  if c.model.embedding_size:
    c.model.embedding_size = 32
  c.data.seq_len, c.batch_size, c.warmup_steps, c.learning_rate = 16, 16, 1, 1e-3
  # Relative tables sized to the sequence (not 2*512-1 rows), so they do not dwarf this tiny model's
  # shardable weights in the FSDP byte count.
  c.model.attention_options.max_relative_position = 16
  # Tensor parallelism splits heads: the ELECTRA generator needs as many heads as the tensor axis (4).
  c.electra.generator_fraction = 1.0
  return c


def main(name, variant, out):
  c = config(name, variant)
  mcfg = pretraining.model_config(c, 128)
  tx, lr = optimizer.make(c), optimizer.schedule(c)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 128, size=(64, 16)).astype(np.int32)
  ids[::3, 12:] = 0
  ids[:, 0] = 2
  examples = {'ids': ids}
  if c.objective in ('mlm+sop', 'mlm+nsp'):
    examples['type_ids'] = (np.arange(16)[None] > 8).astype(np.int32).repeat(64, 0)
    examples['sentence_labels'] = rng.integers(0, 2, 64).astype(np.int32)
  data = pipeline.MLMBatches(examples, c.batch_size, pretrain.Specials(0, 2, 3, 4, 1), 128, seed=0)
  objective = objectives.make(c, mcfg, 16, data.max_predictions, forbidden_ids=(0, 2, 3))
  results = {}
  with hlo.captured_stderr() as log:  # XLA's SPMD warnings, counted below
    run_meshes(c, objective, tx, lr, data, results)
  sys.stderr.write('\n'.join(log) + '\n')
  results['involuntary_remat'] = np.array(sum(hlo.INVOLUNTARY_REMAT in line for line in log))
  np.savez(out, **results)


def run_meshes(c, objective, tx, lr, data, results):
  for mesh_name, shape in MESHES.items():
    n = int(np.prod(shape))
    mesh = jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:n])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(c)):
      s = trainer.sharded_steps(c, objective, tx, lr, mesh)
      state = trainer.initial_state(s)
      if mesh_name == 'fsdp':
        leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
        total = sum(x.nbytes for x in leaves)
        per_device = [sum(sh.data.nbytes for x in leaves for sh in x.addressable_shards if sh.device == d)
                      for d in mesh.devices.flat]
        results['fsdp_bytes_fraction'] = np.array(max(per_device) / total)
      for step in range(2):
        state, m = s.train_step(state, sharding.global_batch(data.batch(step), s.batch_sharding))
      results[f'{mesh_name}/loss'] = np.asarray(m['loss'])
      for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        results[f'{mesh_name}/{jax.tree_util.keystr(path)}'] = np.asarray(leaf)


if __name__ == '__main__':
  main(*sys.argv[1:])
