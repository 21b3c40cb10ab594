"""Small building blocks with logical axis names on every parameter.

Logical names used across posjax (mapped to mesh axes by the trainer's `logical_axis_rules`):
`vocab`, `embed` (model width D), `mlp` (feed-forward width F), `heads` (H), `kv` (head width Dh),
`pos` (position tables), `norm` (LayerNorm scale/bias), `kernel` (convolution taps), `type` (token types),
`groups` (ConvBERT's grouped feed-forward), `embed_out` (a second model-width axis of square matrices),
`classes` (outputs of classification heads), `layers` (the stacked-layers axis of scanned encoders).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from flax import nnx
from flax.core import meta
import flax.linen as nn
import jax
import jax.numpy as jnp


class LogicalAxes(nn.LogicallyPartitioned):
  """The logical-axis box on every posjax parameter: an `nn.LogicallyPartitioned` (the trainer, `nn.unbox`,
  `nn.get_partition_spec` and `nn.logical_to_mesh_sharding` read it as one) that also works where users put
  posjax modules:

  - under `nn.vmap`/`nn.scan` without `metadata_params={nn.PARTITION_NAME: ...}` the new axis is unnamed
    (replicated), as with `PARTITION_NAME: None`, instead of flax's PartitioningUnspecifiedError; a given
    name (the encoder's scan passes `layers`) is used as before;
  - through `nnx.bridge.ToNNX` the NNX variable keeps the logical names as its `out_sharding` and is placed
    on the mesh only when there is one and logical-axis rules to map the names onto it, as linen does:
    NNX's eager sharding would otherwise demand a mesh for any annotated variable ("An auto mesh context or
    metadata is required"). Names the rules do not map stay unsharded (linen's fallback).
  """

  def add_axis(self, index: int, params: dict[Any, Any]) -> LogicalAxes:
    names = list(self.names)
    names[index:index] = [None] * (index - len(names)) + [params.get(nn.PARTITION_NAME)]
    return self.replace(names=tuple(names))

  def remove_axis(self, index: int, params: dict[Any, Any]) -> LogicalAxes:
    names = list(self.names)
    names.pop(index)
    return self.replace(names=tuple(names))

  def to_nnx_metadata(self) -> dict[str, Any]:
    metadata = {'value': self.value, 'out_sharding': self.names, 'sharding_rules': self.rules,
                'mesh': self.mesh, 'eager_sharding': False}
    mesh = self.mesh or meta.get_global_mesh()
    rules = self.rules or nn.get_logical_axis_rules()
    if nnx.using_eager_sharding() and mesh is not None and rules:
      spec = nn.logical_to_mesh_axes(self.names, rules)
      sharding = jax.sharding.NamedSharding(mesh, spec)
      metadata['value'] = (jax.sharding.reshard(self.value, sharding) if mesh.are_all_axes_explicit
                           else jax.lax.with_sharding_constraint(self.value, sharding))
    return metadata


def logical(fn, names: Sequence[str | None]):
  """An initializer whose value is boxed with logical axis names (`LogicalAxes`)."""
  names = tuple(names)

  def init(*args, **kwargs):
    return LogicalAxes(fn(*args, **kwargs), names)
  return init


def init(stddev: float, names: Sequence[str | None]):
  """BERT's truncated-normal-free N(0, stddev) init, annotated with logical axis names."""
  return logical(nn.initializers.normal(stddev), names)


def zeros(names: Sequence[str | None]):
  return logical(nn.initializers.zeros_init(), names)


def ones(names: Sequence[str | None]):
  return logical(nn.initializers.ones_init(), names)


def torch_uniform(fan_in: int, names: Sequence[str | None]):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default init of Conv1d weights and biases, which is also
  kaiming_uniform_(a=sqrt(5)) on a matrix with `fan_in` columns."""
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return logical(init, names)


def zero_padding(x_BxLx, mask_BxL):
  """x with padding positions set to 0 (mask_BxL is True at real tokens)."""
  mask = mask_BxL.reshape(mask_BxL.shape + (1,) * (x_BxLx.ndim - 2))
  return jnp.where(mask, x_BxLx, jnp.zeros((), x_BxLx.dtype))


class DenseGeneral(nn.Module):
  """y = x . W + b contracting `axis` of x; W has shape (contracted dims..., features...) and logical `names`.

  Written here rather than using flax's DenseGeneral because that one initialises a flattened 2-D kernel and
  reshapes it, which breaks logical-axis constraints on 3-D kernels such as q/k/v's (embed, heads, kv).
  """
  features: int | tuple[int, ...]
  names: tuple[str, ...]
  stddev: float = 0.02
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = tuple(self.features) if isinstance(self.features, (tuple, list)) else (self.features,)
    axis = tuple(a % x.ndim for a in (self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)))
    in_shape = tuple(x.shape[a] for a in axis)
    if len(self.names) != len(in_shape) + len(features):
      raise ValueError(f'{self.name}: {len(self.names)} axis names for a kernel of rank '
                       f'{len(in_shape) + len(features)}')
    kernel = self.param('kernel', init(self.stddev, self.names), in_shape + features, self.param_dtype)
    x, kernel = x.astype(self.dtype), jnp.asarray(kernel, self.dtype)
    if axis == tuple(range(x.ndim - len(axis), x.ndim)):
      # As one 2-D product (on CPU the reshapes of contiguous row-major dims are bitcasts): XLA's CPU dot
      # canonicalisation otherwise copied 3-D kernels such as q's (embed, heads, kv) into a transposed layout
      # for every backward pass (4 copies per BERT layer, ~2.4 ms each at base); a 2-D kernel goes to the
      # matmul as it is, as in transformers' Flax BERT. BERT-base layer forward + backward: 0.97x on CPU;
      # not yet measured on GPU/TPU, where tiled layouts can make such reshapes copies.
      n_in = math.prod(in_shape)
      y = (x.reshape(-1, n_in) @ kernel.reshape(n_in, -1)).reshape(x.shape[:x.ndim - len(axis)] + features)
    else:
      y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(in_shape)))), ((), ())))
    if self.use_bias:
      bias = self.param('bias', zeros(self.names[len(in_shape):]), features, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


def dense(features, names: Sequence[str], *, stddev: float, axis=-1, dtype=jnp.float32,
          param_dtype=jnp.float32, use_bias=True, name=None) -> DenseGeneral:
  return DenseGeneral(features=features, names=tuple(names), stddev=stddev, axis=axis, use_bias=use_bias,
                      dtype=dtype, param_dtype=param_dtype, name=name)


def layer_norm(eps: float, dtype=jnp.float32, param_dtype=jnp.float32, name=None) -> nn.LayerNorm:
  # Statistics in float32 whatever the compute dtype (bfloat16 variance underflows).
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      scale_init=ones(('norm',)), bias_init=zeros(('norm',)), name=name)


def take_rows(x_BxLx, rows_BxR):
  """x's rows (axis 1) at rows_BxR, per batch element: BxRx... (any trailing dims)."""
  return jnp.take_along_axis(x_BxLx, rows_BxR.reshape(rows_BxR.shape + (1,) * (x_BxLx.ndim - 2)), axis=1)


def lookup(table_NxE, ids, row_name: str, dtype):
  """table[ids] (shape ids.shape + (E,)) in `dtype`, for a table whose rows have logical axis `row_name`.

  The table is constrained whole along its width first (FSDP shards it there, and gathers every weight
  before use anyway): left sharded, the width of the looked-up rows would claim the mesh axis that also
  splits the batch, and XLA's SPMD partitioner resolves that clash only by replicating the whole BxLxE
  activation ("involuntary full rematerialization"), in the backward pass too."""
  return nn.with_logical_constraint(jnp.asarray(table_NxE, dtype), (row_name, None))[ids]


def broadcast_batch(x_1x, batch: int):
  """x (leading axis 1) repeated `batch` times along axis 0.

  On the CPU as an outer product with a ones vector, so that its gradient, a sum over those rows, is the
  transposed product: a matrix-vector product that runs at memory speed. XLA:CPU's reduction over a leading
  axis (the gradient of jnp.broadcast_to) reads with a stride of the trailing size: ~0.6 GB/s for a BxHxLxL
  attention bias (55 ms per layer at L=512, as long as the attention matmuls) and ~2 GB/s for the MLM
  decoder's (B*P)x30522 bias gradient. HIGHEST precision keeps that product an exact float32 sum. Elsewhere a
  plain broadcast: on a TPU the same product is six bf16 passes of the MXU over a BxHxLxL operand that the
  broadcast never materialises. The choice is the compiled computation's platform (lax.platform_dependent),
  not the host's: an ahead-of-time compile for a TPU gets the broadcast."""
  shape = (batch,) + x_1x.shape[1:]

  def ones_product(x):
    ones_B = jnp.ones((batch,), x.dtype)
    return jnp.einsum('b,n->bn', ones_B, x.reshape(-1), precision=jax.lax.Precision.HIGHEST).reshape(shape)

  return jax.lax.platform_dependent(x_1x, cpu=ones_product, default=lambda x: jnp.broadcast_to(x, shape))


def argmax_last(x):
  """x.argmax(-1) (the first index of the maximum) as a max, a compare and a min over indices. XLA CPU lowers
  argmax to a variadic (value, index) reduction that it does not vectorise: 12 ms for a 160x30522 MLM
  logits array against 0.6 ms for its max. A row containing NaN gives x.shape[-1] (argmax: the NaN's index)."""
  top = x.max(-1, keepdims=True)
  idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.where(x == top, idx, x.shape[-1]).min(-1)


def gelu_exact(x):
  """x * Phi(x) with the erf form PyTorch uses. jax.nn.gelu(approximate=False) goes through erfc, whose
  float32 lowering (an exp and two polynomials behind selects) made the whole BERT-base train step ~6% slower
  on CPU; the two differ by < 1e-6 (erf saturates for x < -5, where gelu is below 1e-6 anyway)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def activation(name: str):
  """HF's names: `gelu` is the exact erf form, `gelu_new` the tanh approximation."""
  return {
      'gelu': gelu_exact,
      'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
      'relu': jax.nn.relu,
      'silu': jax.nn.silu,
  }[name]

