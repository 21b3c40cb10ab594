"""An NNX model around posjax's linen attention (TISA with ConvBERT heads, through `nnx.bridge.ToNNX`), trained with
`nnx.Optimizer` under `nnx.jit`. tests/test_nnx.py trains it in its own process on one device, and runs this
file in a process with 4 CPU devices to train it on a 2x2 mesh."""

import sys

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import posjax

CONFIG = posjax.ModelConfig(vocab_size=16, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                            attention='tisa+convbert', attention_dropout=0.0,
                            attention_options=(('convbert_kernel_size', 3), ('tisa_kernels', 3)))
# What an NNX user writes to shard posjax's logical names over a (data, tensor) mesh.
RULES = (('batch', 'data'), ('heads', 'tensor'), ('mlp', 'tensor'))
TX = optax.adam(1e-2)  # one object, so that nnx.jit's cache serves every model trained here


class PreviousToken(nnx.Module):
  """Predicts, at every position, the token one step to its left (only position information solves it)."""

  def __init__(self, config, *, rngs):
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    # TISA's position term in the scores of two dot-product heads, ConvBERT's convolution heads beside them.
    self.attention = nnx.bridge.ToNNX(posjax.MultiHeadAttention(config), rngs=rngs)
    self.out = nnx.Linear(config.hidden_size, config.vocab_size, rngs=rngs)

  def __call__(self, ids_BxL, mask_BxL):
    x_BxLxD = self.embed(ids_BxL)
    return self.out(x_BxLxD + self.attention(x_BxLxD, mask_BxL))


def batch(seed=0):
  """ids_BxL, mask_BxL: 8x12, every third row padded after 9 tokens."""
  ids = np.random.default_rng(seed).integers(1, 16, (8, 12)).astype(np.int32)
  mask = np.ones(ids.shape, bool)
  mask[::3, 9:] = False
  ids[~mask] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


def build():
  """The model, created as users write it: eagerly, then `lazy_init` with a sample batch."""
  model = PreviousToken(CONFIG, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, *batch())
  return model


# The same under nnx.jit: one compilation instead of one per eager operation (seconds on a CPU).
build_jit = nnx.jit(build)


@nnx.jit
def step(model, opt, ids_BxL, mask_BxL):
  def loss_fn(model):
    logits = model(ids_BxL, mask_BxL)[:, 1:]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, ids_BxL[:, :-1])
    return (loss * mask_BxL[:, 1:]).sum() / mask_BxL[:, 1:].sum()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


def train(model, steps=5, put=lambda x: x):
  """Losses of `steps` Adam steps on one batch (placed by `put`)."""
  opt = nnx.Optimizer(model, TX, wrt=nnx.Param)
  ids_BxL, mask_BxL = map(put, batch())
  return np.array([float(step(model, opt, ids_BxL, mask_BxL)) for _ in range(steps)])


def main(out):
  """Trains on a 2x2 (data, tensor) mesh; writes the losses and the shardings of two parameters."""
  mesh = jax.make_mesh((2, 2), ('data', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    model = build()
    created = tuple(model.attention.query['kernel'][...].sharding.spec)
    batch_sharding = jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(('batch',)))
    sharded = train(model, put=lambda x: jax.device_put(x, batch_sharding))
    trained = tuple(model.attention.convbert['conv_out']['kernel'][...].sharding.spec)
  np.savez(out, sharded=sharded, created=np.array(created, str), trained=np.array(trained, str))


if __name__ == '__main__':
  main(sys.argv[1])  # run by tests/test_nnx.py with XLA_FLAGS giving 4 CPU devices
