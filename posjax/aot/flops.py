"""Model FLOPs of a training step: the matrix products a BERT-family model needs, counted from its config.

Forward FLOPs are 2 x (multiply-adds of every matmul); a training step is 3 x forward (the backward pass
computes gradients for both operands of each product). Per encoder layer and sequence of L tokens, with
width D, feed-forward F (in G groups), H heads of width Dh of which Ha are dot-product heads:

    projections  2 L (3 D Ha Dh + H Dh D) + 2 L (2 D F / G)       # q, k, v, out; feed-forward
    attention    4 L^2 Ha Dh                                     # q.k and p.v
    ConvBERT     2 L (D Ha Dh + Ha Dh Hc K + D Hc Dh + K D + K Hc Dh)   # its Hc = H - Ha span-conv heads

plus the embedding projection (E -> D), the MLM head on the P predicted positions (D E + E V), the
pooler and sentence head on [CLS], and ELECTRA's discriminator head; ELECTRA counts its generator and its
discriminator. What this leaves out is not model work: elementwise ops, embedding gathers, recomputation
(remat), position terms of the variants (relative, TISA, T5, ...), and the optimizer update.
That is the usual definition behind MFU (6 N T + attention, as in the PaLM paper's appendix), written out
for these models.
"""

from __future__ import annotations

from posjax.attention import registry
from posjax.config import ModelConfig


def _conv_heads(cfg: ModelConfig) -> int:
  plan = registry.parse(cfg.attention)
  return sum(c.takes_heads(cfg) for c in plan.heads)


def encoder_forward(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs of the encoder layers (with the embedding projection) for one sequence."""
  d, l, dh, f, g = cfg.hidden_size, seq_len, cfg.head_dim, cfg.intermediate_size, cfg.ffn_groups
  hc = _conv_heads(cfg)
  ha = cfg.num_heads - hc
  layer = 2 * l * (3 * d * ha * dh + cfg.num_heads * dh * d) + 2 * l * (2 * d * f / g) + 4 * l * l * ha * dh
  if hc:
    k = int(cfg.option('convbert_kernel_size'))
    layer += 2 * l * (d * ha * dh + ha * dh * hc * k + d * hc * dh + k * d + k * hc * dh)
  projection = 2 * l * cfg.embed_dim * d if cfg.embedding_size else 0
  return cfg.num_layers * layer + projection


def model_forward(cfg: ModelConfig, seq_len: int, predictions: int) -> float:
  """Forward FLOPs of one sequence through the encoder and the heads `cfg` has (the MLM head on
  `predictions` positions)."""
  d, e = cfg.hidden_size, cfg.embed_dim
  total = encoder_forward(cfg, seq_len)
  if cfg.mlm_head:
    total += 2 * predictions * (d * e + e * cfg.vocab_size)
  if cfg.pooler:
    total += 2 * d * d
  if cfg.sentence_head:
    total += 2 * d * 2
  if cfg.discriminator_head:
    total += 2 * seq_len * (d * d + d)
  return total


def train_step(model, batch_size: int, seq_len: int, predictions: int) -> float:
  """Model FLOPs of one training step (forward and backward) of a pretraining objective's `model`: a `Bert`
  or an `ElectraPretrainer` (its generator and discriminator)."""
  from posjax.models.electra import ElectraPretrainer, discriminator_config, generator_config  # pylint: disable=g-import-not-at-top
  if isinstance(model, ElectraPretrainer):
    configs = [generator_config(model.config, model.generator_fraction), discriminator_config(model.config)]
  else:
    configs = [model.config]
  return 3 * batch_size * sum(model_forward(c, seq_len, predictions) for c in configs)
