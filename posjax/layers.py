"""Small building blocks with logical axis names on every parameter.

Logical names used across posjax (mapped to mesh axes by the trainer's `logical_axis_rules`):
`vocab`, `embed` (model width D), `mlp` (feed-forward width F), `heads` (H), `kv` (head width Dh),
`pos` (position tables), `norm` (LayerNorm scale/bias), `kernel` (convolution taps), `type` (token types),
`groups` (ConvBERT's grouped feed-forward), `embed_out` (a second model-width axis of square matrices),
`classes` (outputs of classification heads), `layers` (the stacked-layers axis of scanned encoders).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def init(stddev: float, names: Sequence[str | None]):
  """BERT's truncated-normal-free N(0, stddev) init, annotated with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), tuple(names))


def zeros(names: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def ones(names: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(names))


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
    y = jax.lax.dot_general(x.astype(self.dtype), jnp.asarray(kernel, self.dtype),
                            ((axis, tuple(range(len(in_shape)))), ((), ())))
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


def activation(name: str):
  """HF's names: `gelu` is the exact erf form, `gelu_new` the tanh approximation."""
  return {
      'gelu': lambda x: jax.nn.gelu(x, approximate=False),
      'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
      'relu': jax.nn.relu,
      'silu': jax.nn.silu,
  }[name]

