"""Run in a process with 8 CPU devices by tests/test_flash.py: a TISA+T5(+relative_key_query+convk) attention layer's output and gradients
with the fused kernel under a data x fsdp x tensor = 2 x 2 x 2 mesh (batch over data and fsdp, heads over
tensor) and with the XLA path on one device, written to an .npz; also the output for a single row, which the
batch axes do not divide. Both kernels: the TPU's (Mosaic) with heads of 8 and relative_key_query and convk
terms too, the GPU's (Triton) with heads of 16, each in interpret mode."""

import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import load_config_module  # noqa: E402
import posjax  # noqa: E402
from posjax.attention import flash  # noqa: E402
from posjax.training import sharding  # noqa: E402


def main(out):
  results = {}
  for kernel, hidden, variant in (('mosaic', 32, 'tisa+t5+relative_key_query+convk'), ('triton', 64, 'tisa+t5')):
    flash.kernel_for = lambda platform, kernel=kernel: kernel
    results.update({f'{kernel}/{k}': v for k, v in compare(hidden, variant).items()})
  np.savez(out, **results)


def compare(hidden, variant):
  rules = sharding.rules(load_config_module('bert').get_config('tiny'))
  cfg = posjax.ModelConfig(vocab_size=64, hidden_size=hidden, num_layers=1, num_heads=4, intermediate_size=48,
                           max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                           attention=variant, attention_options=(
                               ('t5_num_buckets', 8), ('tisa_kernels', 2),
                               *((('max_relative_position', 12), ('composite_kernel_size', 5))
                                 if 'relative' in variant else ())))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 20, hidden)).astype(np.float32)
  mask = np.ones((8, 20), bool)
  mask[::3, 13:] = False
  w = rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.size)
  shapes = nn.unbox(jax.eval_shape(posjax.attention.MultiHeadAttention(cfg).init, jax.random.PRNGKey(0), x,
                                   mask)['params'])
  # Weights scaled with the width so both configurations give outputs of the same size (a few units).
  params = jax.tree.map(lambda s: (0.3 * np.sqrt(32 / hidden) * rng.standard_normal(s.shape)).astype(np.float32),
                        shapes)
  results = {}
  for impl, shape in (('xla', (1, 1, 1)), ('pallas', (2, 2, 2))):
    layer = posjax.attention.MultiHeadAttention(dataclasses.replace(cfg, attention_impl=impl))
    mesh = jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:int(np.prod(shape))])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      spec = nn.get_partition_spec(jax.eval_shape(layer.init, jax.random.PRNGKey(0), x, mask))['params']
      p = jax.device_put(params, nn.logical_to_mesh_sharding(spec, mesh, rules))
      batch = NamedSharding(mesh, P(('data', 'fsdp')))
      xs, ms = jax.device_put(x, batch), jax.device_put(mask, batch)

      def loss(p, x, m):
        y = layer.apply({'params': p}, x, m)
        return jnp.sum(y * w), y
      (_, y), g = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(p, xs, ms)
      # One row does not split over the batch axes (as when the trainer initialises under its mesh): the
      # kernel then runs on the whole batch on every device of those axes.
      y1 = jax.jit(lambda p, x, m: layer.apply({'params': p}, x, m))(p, x[:1], mask[:1])
    results[f'{impl}/y'] = np.asarray(y)
    results[f'{impl}/y_one_row'] = np.asarray(y1)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
      results[f'{impl}/{jax.tree_util.keystr(path)}'] = np.asarray(leaf)
  return results


if __name__ == '__main__':
  main(*sys.argv[1:])
