"""posjax's linen modules in Flax NNX (nnx.bridge.ToNNX + lazy_init, as users write it, with no eager-sharding
switch) and under nn.vmap (with no partition name): TISA and ConvBERT attention train with nnx.Optimizer under
nnx.jit on one device and on a 2x2 mesh; an nn.vmap ensemble equals its members applied one by one."""

import os
import subprocess
import sys

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import nnx_worker
from helpers import xla_flags
import posjax

HERE = os.path.dirname(os.path.abspath(__file__))


def test_to_nnx_equals_linen_apply_and_trains():
  model = nnx_worker.build_jit()
  ids, mask = nnx_worker.batch()
  # The wrapped module computes what linen's apply does with the same parameters.
  params = nnx.to_pure_dict(nnx.state(model.attention, nnx.Param))
  x_BxLxD = model.embed(ids)
  want = jax.jit(posjax.MultiHeadAttention(nnx_worker.CONFIG).apply)({'params': params}, x_BxLxD, mask)
  np.testing.assert_allclose(model.attention(x_BxLxD, mask), want, atol=1e-6)
  # Logical names survive as the NNX variables' metadata (no mesh here, so nothing was placed).
  assert model.attention.query['kernel'].get_metadata()['out_sharding'] == ('embed', 'heads', 'kv')
  assert model.attention.tisa['offset'].get_metadata()['out_sharding'] == ('kernel', 'heads')
  assert model.attention.convbert['key_depthwise'].get_metadata()['out_sharding'] == ('kernel', 'embed')
  losses = nnx_worker.train(model)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses


def test_mesh_training_matches_one_device(tmp_path):
  out = tmp_path / 'nnx.npz'
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS='cpu')
  run = subprocess.Popen([sys.executable, os.path.join(HERE, 'nnx_worker.py'), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  single = nnx_worker.train(nnx_worker.build_jit())  # meanwhile, on this process's one device
  _, stderr = run.communicate(timeout=300)
  assert run.returncode == 0, stderr[-4000:]
  r = np.load(out)
  np.testing.assert_allclose(r['sharded'], single, rtol=1e-5)
  # Created sharded (heads over the tensor axis) by the mesh and rules in context, and still so after training.
  assert list(r['created']) == ['None', 'tensor', 'None']
  assert list(r['trained'])[:2] == ['None', 'tensor']


def test_vmap_ensemble_without_partition_name():
  cfg = nnx_worker.CONFIG  # TISA with ConvBERT heads
  ensemble = nn.vmap(posjax.MultiHeadAttention, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=None, axis_size=3)(cfg)
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 32))
  mask_BxL = jnp.arange(7)[None] < jnp.array([[7], [4]])
  boxed = jax.jit(ensemble.init)(jax.random.PRNGKey(0), x_BxLxD, mask_BxL)['params']
  # The ensemble axis is unnamed (replicated); the module's own names follow it.
  assert boxed['query']['kernel'].names == (None, 'embed', 'heads', 'kv')
  params = nn.unbox(boxed)

  def loss(p):
    y_ExBxLxD = ensemble.apply({'params': p}, x_BxLxD, mask_BxL)
    return (y_ExBxLxD ** 2).sum(), y_ExBxLxD
  (_, y_ExBxLxD), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  member = jax.jit(posjax.MultiHeadAttention(cfg).apply)
  for e in range(3):
    p = jax.tree_util.tree_map(lambda a: a[e], params)
    np.testing.assert_allclose(y_ExBxLxD[e], member({'params': p}, x_BxLxD, mask_BxL), atol=1e-6)
  assert not np.allclose(y_ExBxLxD[0], y_ExBxLxD[1])  # members initialised apart
