"""Composite attention (Chang, Xu, Xu & Tu 2021, "Convolutions and Self-Attention: Re-interpreting Relative
Positions in Pre-trained Language Models", ACL): convolution terms added to the attention logits.

With k = (`composite_kernel_size` - 1) / 2 and c(i, j) = clip(j - i, -k, k):

- `convfixed`: e_hij += w_{h, c(i,j)}                  fixed lightweight convolution, w of shape Hx(2k+1);
- `convq`:     e_hij += q_hi . r_{c(i,j)} / sqrt(Dh)    query-based dynamic lightweight convolution (Shaw et
                                                        al.'s relative keys), r of shape (2k+1)xDh shared by
                                                        the heads;
- `convk`:     e_hij += k_hj . r_{c(i,j)} / sqrt(Dh)    key-based dynamic lightweight convolution.

Relative positions beyond the window are clipped to the edge weight, not excluded, as in the relative
embeddings the paper unifies (Shaw et al. 2018 clip; the official README calls `convq` "query-based dynamic
lightweight convolution (relative embeddings)"). So the window only bounds the number of parameters, and a
term alone (`use_qk=False`) is a lightweight convolution of the values whose kernel spans the whole sequence
with the taps beyond +-k tied to the edge taps; for sequences no longer than k+1 it is exactly the windowed
(softmax-normalised) convolution of Wu et al. 2019, renormalised over the taps inside the sequence.
The default width 17 (8 positions each way) is the paper's; tables start as N(0, initializer_range) like
BERT's embeddings. Each term is BxHxL(2k+1) work spread over LxL by a skew; nothing of size BxHxLxLxDh is
built.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from posjax import layers
from posjax.attention import registry
from posjax.attention.relative import skew, toeplitz
from posjax.config import ModelConfig
from posjax.errors import ConfigError


def kernel_radius(cfg: ModelConfig) -> int:
  """k from the odd window width `composite_kernel_size` = 2k+1."""
  width = cfg.option('composite_kernel_size')
  if isinstance(width, bool) or not isinstance(width, int) or width < 1 or width % 2 == 0:
    raise ConfigError(f'composite_kernel_size must be an odd positive integer (2k+1 taps for relative '
                      f'positions -k..k, e.g. 17); got {width!r}')
  return (width - 1) // 2


def clipped_taps(s_xR, length: int):
  """e[..., (L-1) + d] = s[..., clip(d, -k, k) + k] for the 2L-1 distances d = -(L-1)..L-1 of a length-L
  sequence, from the R = 2k+1 taps: the edge taps repeated beyond +-k (broadcasts and a concatenation, whose
  gradient is a sum; no gather)."""
  k = (s_xR.shape[-1] - 1) // 2
  reach = min(k, length - 1)
  middle = s_xR[..., k - reach:k + reach + 1]
  edge = (*s_xR.shape[:-1], length - 1 - reach)
  return jnp.concatenate([jnp.broadcast_to(s_xR[..., :1], edge), middle,
                          jnp.broadcast_to(s_xR[..., -1:], edge)], axis=-1)


class ConvFixed(nn.Module):
  """Returns bias_1xHxLxL with bias[0, h, i, j] = w[h, clip(j - i) + k]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic=True):
    del k_BxLxHxDh, mask_BxL, deterministic  # padded keys are masked by the core
    cfg = self.config
    k = kernel_radius(cfg)
    l, h = q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[2]
    w_HxR = self.param('kernel', layers.init(cfg.initializer_range, ('heads', 'kernel')), (h, 2 * k + 1),
                       cfg.param_dtype)
    return toeplitz(clipped_taps(jnp.asarray(w_HxR, cfg.dtype), l), l)[None]


class ConvDynamic(nn.Module):
  """Returns term_BxHxLxL = x_{h,n} . r_{clip(j - i) + k} / sqrt(Dh), n = i (queries) or n = j (keys)."""
  config: ModelConfig
  from_keys: bool = False

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic=True):
    del mask_BxL, deterministic  # padded keys are masked by the core; the taps do not depend on padding
    cfg = self.config
    k = kernel_radius(cfg)
    l, dh = q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[3]
    r_RxDh = self.param('kernel', layers.init(cfg.initializer_range, ('kernel', 'kv')), (2 * k + 1, dh),
                        cfg.param_dtype)
    x_BxLxHxDh = k_BxLxHxDh if self.from_keys else q_BxLxHxDh
    # Every position meets only the 2k+1 distinct taps; the LxL term is this small product spread over the
    # distances of each row (n's) and skewed (relative.skew), never a gather, whose scatter-add gradient
    # the TPU compiler lays out with batch and heads last, padded to 128 lanes.
    s_BxHxLxR = jnp.einsum('bnhd,rd->bhnr', x_BxLxHxDh, jnp.asarray(r_RxDh, x_BxLxHxDh.dtype))
    s_BxHxLxR = s_BxHxLxR / jnp.sqrt(jnp.asarray(dh, s_BxHxLxR.dtype))
    if self.from_keys:
      # [b, h, i, j] = s[b, h, j, tap(j - i)]: row j over i - j, i.e. the taps reversed, then transposed.
      return jnp.swapaxes(skew(clipped_taps(s_BxHxLxR[..., ::-1], l), l), -1, -2)
    return skew(clipped_taps(s_BxHxLxR, l), l)  # [b, h, i, j] = s[b, h, i, tap(j - i)]


_PAPER = 'Chang et al. 2021 (composite attention)'
_OPTIONS = (('composite_kernel_size', 17),)  # 2k+1 taps; odd; 17 in the paper
_DYNAMIC = dict(params='(2k+1)*Dh (2k+1 = composite_kernel_size)', cost='O(B H L (2k+1) Dh) + O(B H L^2)',
                options=_OPTIONS)

registry.register(registry.Component(
    'convfixed', 'score', ConvFixed, paper=_PAPER + ', fixed lightweight convolution',
    params='(2k+1)*H (2k+1 = composite_kernel_size)', cost='O(H L^2)', options=_OPTIONS))
registry.register(registry.Component(
    'convq', 'score', lambda cfg, name=None: ConvDynamic(cfg, from_keys=False, name=name),
    paper=_PAPER + ', query-based dynamic lightweight convolution', **_DYNAMIC))
registry.register(registry.Component(
    'convk', 'score', lambda cfg, name=None: ConvDynamic(cfg, from_keys=True, name=name),
    paper=_PAPER + ', key-based dynamic lightweight convolution', **_DYNAMIC))
