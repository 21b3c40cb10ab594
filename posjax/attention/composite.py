"""Composite attention (Chang, Xu, Xu & Tu 2021, "Convolutions and Self-Attention: Re-interpreting Relative
Positions in Pre-trained Language Models", ACL): convolution terms added to the attention logits.

With k = (`composite_kernel_size` - 1) / 2 and c(d) = clip(d, -k, k) + k, the tap of offset d:

- `convfixed`: e_hij += w_{h, c(j-i)}                  fixed lightweight convolution, w of shape Hx(2k+1);
- `convq`:     e_hij += q_hi . r_{c(j-i)} / sqrt(Dh)    query-based dynamic lightweight convolution (Shaw et
                                                        al.'s relative keys), r of shape (2k+1)xDh shared by
                                                        the heads;
- `convk`:     e_hij += k_hj . r_{c(i-j)} / sqrt(Dh)    key-based dynamic lightweight convolution: its taps are
                                                        indexed by the query's offset from the key, i - j (the
                                                        authors' code gathers as for queries, then transposes).

These are the conventions of the authors' code (mlpc-ucsd/BERT_Convolutions, `modeling_bert.py`), so their
`convfixed_param` (1xHx1x(2k+1)), `convq_param` and `convk_param` (Dhx(2k+1)) import as they are
(`posjax.convert.chang`). Indexing `convk` by j - i instead spans the same functions with its taps reversed.
Relative positions beyond the window are clipped to the edge weight, not excluded, as in the relative
embeddings the paper unifies (Shaw et al. 2018 clip; the official README calls `convq` "query-based dynamic
lightweight convolution (relative embeddings)"). So the window only bounds the number of parameters, and a
term alone (`use_qk=False`) is a lightweight convolution of the values whose kernel spans the whole sequence
with the taps beyond +-k tied to the edge taps; for sequences no longer than k+1 it is exactly the windowed
(softmax-normalised) convolution of Wu et al. 2019, renormalised over the taps inside the sequence.
The default width 17 (8 positions each way) is the paper's. Initialisation is the authors': `convfixed`
starts at zero (no bias), `convq`/`convk` at U(+-1/sqrt(2k+1)) (their kaiming_uniform_(a=sqrt(5)) on the
Dhx(2k+1) table). Each term is BxHxL(2k+1) work spread over LxL by a skew; nothing of size BxHxLxLxDh is
built. In the fused TPU kernel (`model.attention_impl`, `posjax.attention.flash`) no LxL term is built at all:
`convfixed` enters as its offset table, `convq`/`convk` as their taps by offset (`flash.Distances`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from posjax import layers
from posjax.attention import flash, registry
from posjax.attention.relative import skew
from posjax.config import ModelConfig


def kernel_radius(cfg: ModelConfig) -> int:
  """k from the odd window width `composite_kernel_size` = 2k+1."""
  return (cfg.option('composite_kernel_size') - 1) // 2


def convfixed_offsets(cfg: ModelConfig, params, length: int, heads: int):
  """table_HxR[h, d + L - 1] = w[h, clip(d, -k, k) + k], d = j - i, from `kernel` (H, 2k+1)."""
  del cfg, heads  # k is the kernel's
  return clipped_taps(jnp.asarray(params['kernel'], jnp.float32), length)


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
  """Returns the offset table_HxR of w[h, clip(d) + k] (see `convfixed_offsets`)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic=True):
    del k_BxLxHxDh, mask_BxL, deterministic  # padded keys are masked by the core
    cfg = self.config
    k = kernel_radius(cfg)
    l, h = q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[2]
    w_HxR = self.param('kernel', layers.zeros(('heads', 'kernel')), (h, 2 * k + 1), cfg.param_dtype)
    return convfixed_offsets(cfg, {'kernel': w_HxR}, l, h)


class ConvDynamic(nn.Module):
  """Returns term_BxHxLxL: q_{h,i} . r_{clip(j - i) + k} / sqrt(Dh) (queries), k_{h,j} . r_{clip(i - j) + k} /
  sqrt(Dh) (keys); with `fused`, the `flash.Distances` from which the fused kernel computes it tile by tile."""
  config: ModelConfig
  from_keys: bool = False
  fused: bool = False

  @nn.compact
  def __call__(self, q_BxLxHxDh, k_BxLxHxDh, mask_BxL, deterministic=True):
    del mask_BxL, deterministic  # padded keys are masked by the core; the taps do not depend on padding
    cfg = self.config
    k = kernel_radius(cfg)
    l, dh = q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[3]
    r_RxDh = self.param('kernel', layers.torch_uniform(2 * k + 1, ('kernel', 'kv')), (2 * k + 1, dh),
                        cfg.param_dtype)
    if self.fused:
      return flash.Distances(r_RxDh, self.from_keys, 'key' if self.from_keys else 'query', 1.0 / dh ** 0.5)
    x_BxLxHxDh = k_BxLxHxDh if self.from_keys else q_BxLxHxDh
    # Every position meets only the 2k+1 distinct taps; the LxL term is this small product spread over the
    # distances of each row (n's) and skewed (relative.skew), never a gather, whose scatter-add gradient
    # the TPU compiler lays out with batch and heads last, padded to 128 lanes.
    s_BxHxLxR = jnp.einsum('bnhd,rd->bhnr', x_BxLxHxDh, jnp.asarray(r_RxDh, x_BxLxHxDh.dtype))
    s_BxHxLxR = s_BxHxLxR / jnp.sqrt(jnp.asarray(dh, s_BxHxLxR.dtype))
    if self.from_keys:
      # [b, h, i, j] = s[b, h, j, clip(i - j) + k]: the queries' form with i and j exchanged.
      return jnp.swapaxes(skew(clipped_taps(s_BxHxLxR, l), l), -1, -2)
    return skew(clipped_taps(s_BxHxLxR, l), l)  # [b, h, i, j] = s[b, h, i, clip(j - i) + k]


_PAPER = 'Chang et al. 2021 (composite attention)'
_OPTIONS = (registry.integer('composite_kernel_size', 17, odd=True),)  # 2k+1 taps for offsets -k..k; 17 in the paper
_DYNAMIC = dict(params='(2k+1)*Dh (2k+1 = composite_kernel_size)', cost='O(B H L (2k+1) Dh) + O(B H L^2)',
                options=_OPTIONS, distances=True)

registry.register(registry.Component(
    'convfixed', 'score', ConvFixed, paper=_PAPER + ', fixed lightweight convolution',
    params='(2k+1)*H (2k+1 = composite_kernel_size)', cost='O(H L^2)', options=_OPTIONS,
    offsets=convfixed_offsets))
registry.register(registry.Component(
    'convq', 'score', lambda cfg, name=None, **kw: ConvDynamic(cfg, from_keys=False, name=name, **kw),
    paper=_PAPER + ', query-based dynamic lightweight convolution', **_DYNAMIC))
registry.register(registry.Component(
    'convk', 'score', lambda cfg, name=None, **kw: ConvDynamic(cfg, from_keys=True, name=name, **kw),
    paper=_PAPER + ', key-based dynamic lightweight convolution', **_DYNAMIC))
