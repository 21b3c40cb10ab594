"""Positional attention and learned positional kernels, per layer and head, read from parameters.

A kernel is a function of the offset d = j - i (key position minus query position), d = -(n-1)..n-1, giving
what the variant adds to the attention logit of query i and key j = i + d before the softmax:

- `tisa`:      k_h(d) = f_h(i - j) = sum_s a_sh exp(-|b_sh| (-d - c_sh)^2)   (posjax evaluates f at i - j)
- `convfixed`: k_h(d) = w_h[clip(d, -k, k) + k]
- `t5`:        k_h(d) = table[bucket(d), h]
- `alibi`:     k_h(d) = -m_h |d|
- `absolute` / `sinusoidal` (the effective kernel): the diagonal means of the embeddings' positional
  attention (P W_q)(P W_k)^T / sqrt(Dh) (see `invariance`).

The content-free score terms' kernels are their components' own offset tables (`registry.Component.offsets`,
the functions the model runs), evaluated on the checkpoint's parameters. Content-dependent terms
(`relative_key*`, `convq`, `convk`) and RoPE have no content-free kernel and are not reported as kernels;
`relative_tables` gives the `convq`/`convk` tables by offset instead (in their documented orientation: `convk`
reads row clip(i - j) + k).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import numpy as np

from posjax.analysis import invariance
from posjax.attention import registry
from posjax.attention import offsets
from posjax.attention.absolute import sinusoid_table
from posjax.attention.composite import kernel_radius
from posjax.config import ModelConfig


def backbone(params) -> dict:
  """The encoder's parameters (embeddings, encoder, embedding projection) from a posjax model's params: a
  `Bert` (any heads) or an `ElectraPretrainer` (its discriminator, with the shared embeddings)."""
  params = dict(nn.unbox(params))
  if 'discriminator' in params:
    params = {**params['discriminator'], 'embeddings': params['embeddings']}
  return {k: params[k] for k in ('embeddings', 'encoder', 'embedding_projection') if k in params}


def layer_names(cfg: ModelConfig) -> list[str]:
  """The encoder's distinct parameter sets: every layer, or ALBERT's shared groups' layers."""
  n = cfg.layer_groups * cfg.inner_group_size if cfg.layer_groups else cfg.num_layers
  return [f'layer_{k}' for k in range(n)]


def position_embeddings(cfg: ModelConfig, params, n: int) -> np.ndarray | None:
  """P_nxD: the first n absolute position embeddings as the encoder's first layer sees them (projected to
  the model width for factorised embeddings), LayerNorm and biases left out as in the paper's P W_q; None
  when the variant has no absolute positions."""
  pe = registry.parse(cfg.attention).position_embedding
  if pe is None or pe.name == 'none':
    return None
  if n > cfg.max_position_embeddings:
    raise ValueError(f'n={n} exceeds model.max_position_embeddings={cfg.max_position_embeddings}')
  p = backbone(params)
  if pe.name == 'absolute':
    p_NxE = np.asarray(p['embeddings']['position_embeddings']['embedding'], np.float64)[:n]
  else:
    p_NxE = sinusoid_table(n, cfg.embed_dim).astype(np.float64)
  if cfg.embedding_size:
    p_NxE = p_NxE @ np.asarray(p['embedding_projection']['kernel'], np.float64)
  return p_NxE


def embedding_positional_attention(cfg: ModelConfig, params, n: int) -> list[np.ndarray] | None:
  """Per distinct layer, F_HxNxN = (P W_q^h)(P W_k^h)^T / sqrt(Dh): the logits position alone contributes
  through the absolute embeddings (Wennberg & Henter's hat-F_P), or None without absolute positions, and
  when `convqkv` convolves queries or keys (their positional part is then not a product of projections)."""
  p_NxD = position_embeddings(cfg, params, n)
  proj = registry.parse(cfg.attention).projection
  if p_NxD is None or (proj is not None and set('qk') & set(cfg.option('convqkv_targets'))):
    return None
  enc = backbone(params)['encoder']
  out = []
  for name in layer_names(cfg):
    att = enc[name]['attention']
    q_NxHxDh = np.einsum('nd,dhk->nhk', p_NxD, np.asarray(att['query']['kernel'], np.float64))
    k_NxHxDh = np.einsum('nd,dhk->nhk', p_NxD, np.asarray(att['key']['kernel'], np.float64))
    out.append(np.einsum('ihk,jhk->hij', q_NxHxDh, k_NxHxDh) / np.sqrt(q_NxHxDh.shape[-1]))
  return out


@dataclasses.dataclass
class Kernel:
  """One variant's kernel in one layer: values_HxR at offsets_R (d = j - i) and the parameters it came from
  (float64; empty for the embeddings' effective kernel and for ALiBi, which has none)."""
  variant: str
  offsets_R: np.ndarray
  values_HxR: np.ndarray
  params: dict


@dataclasses.dataclass
class Table:
  """A `convq`/`convk` table in one layer by offset: values_RxDh[r] . x / sqrt(Dh) is added to the logit at
  offset offsets_R[r] = j - i, x the query (`convq`) or the key (`convk`)."""
  variant: str
  offsets_R: np.ndarray
  values_RxDh: np.ndarray


def relative_tables(cfg: ModelConfig, params, n: int) -> list[dict[str, Table]]:
  """Per distinct layer, {'convq' | 'convk': Table} at offsets -(n-1)..n-1 (empty without those terms)."""
  names = [c.name for c in registry.parse(cfg.attention).score if c.name in ('convq', 'convk')]
  enc = backbone(params)['encoder']
  d_R = np.arange(-(n - 1), n)
  out = []
  for layer in layer_names(cfg):
    att = nn.unbox(enc[layer]['attention'])
    out.append({name: Table(name, d_R, np.asarray(att[name]['kernel'], np.float64)[
        offsets.clipped_row(d_R, kernel_radius(cfg), negate=name == 'convk')]) for name in names})
  return out


def dot_product_heads(cfg: ModelConfig) -> int:
  plan = registry.parse(cfg.attention)
  return cfg.num_heads - sum(c.takes_heads(cfg) for c in plan.heads)


def attention_kernels(cfg: ModelConfig, attention_params, n: int) -> dict[str, Kernel]:
  """{variant: Kernel} of the content-free score terms of one `MultiHeadAttention`'s parameters (e.g. a
  posjax attention module inside your own model), at offsets -(n-1)..n-1."""
  h = dot_product_heads(cfg)
  attention_params = nn.unbox(attention_params)  # straight from `init`: drop the logical-axis boxes
  out = {}
  for c in registry.parse(cfg.attention).score:
    if c.offsets is not None:
      p = {k: np.asarray(v, np.float64) for k, v in attention_params.get(c.name, {}).items()}
      vals = np.asarray(c.offsets(cfg, p, n, h), np.float64)
      out[c.name] = Kernel(c.name, offsets.distances(n), vals, p)
  return out


def kernels(cfg: ModelConfig, params, n: int) -> list[dict[str, Kernel]]:
  """Per distinct layer, {variant: Kernel} for the content-free score terms and, with absolute positions,
  the embeddings' effective kernel ('absolute' or 'sinusoidal'), at offsets -(n-1)..n-1."""
  plan = registry.parse(cfg.attention)
  enc = backbone(params)['encoder']
  emb = embedding_positional_attention(cfg, params, n)
  out = []
  for li, name in enumerate(layer_names(cfg)):
    layer = attention_kernels(cfg, enc[name]['attention'], n)
    if emb is not None:
      layer[plan.position_embedding.name] = Kernel(
          plan.position_embedding.name, offsets.distances(n), invariance.diagonal_means(emb[li]), {})
    out.append(layer)
  return out


def positional_attention(cfg: ModelConfig, params, n: int) -> list[np.ndarray]:
  """Per distinct layer, HxNxN: every content-free positional contribution to the logits summed, the
  embeddings' (P W_q)(P W_k)^T / sqrt(Dh) plus the kernels of TISA, convfixed, T5 and ALiBi spread over
  the matrix ([h, i, j] = k_h(j - i)). Zeros where the variant has neither."""
  h = dot_product_heads(cfg)
  emb = embedding_positional_attention(cfg, params, n)
  ks = kernels(cfg, params, n)
  idx = invariance._offsets(n, n)  # pylint: disable=protected-access
  out = []
  for li in range(len(layer_names(cfg))):
    total = np.zeros((h, n, n)) if emb is None else emb[li].copy()
    for name, k in ks[li].items():
      if registry.get(name).role == 'score':
        total += k.values_HxR[:, idx]
    out.append(total)
  return out
