"""The BERT family as pure-functional linen modules, post-LN, with any attention variant.

One encoder serves BERT (Devlin et al. 2019), ALBERT (Lan et al. 2020: factorised embeddings, layers shared
across groups, sentence-order head), ELECTRA (Clark et al. 2020: embedding projection, discriminator head)
and ConvBERT (Jiang et al. 2020: the `convbert` attention variant plus a grouped feed-forward); the
differences are `ModelConfig` fields, not classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from posjax import layers
from posjax.attention import MultiHeadAttention, registry
from posjax.config import ModelConfig


def _dense(cfg: ModelConfig, features, names, name, **kw):
  return layers.dense(features, names, stddev=cfg.initializer_range, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name=name, **kw)


def _norm(cfg: ModelConfig, name):
  return layers.layer_norm(cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype, name=name)


class Embeddings(nn.Module):
  """word + (position) + token type -> LayerNorm -> dropout; returns x_BxLxE and the word table VxE."""
  config: ModelConfig

  @nn.compact
  def __call__(self, ids_BxL, type_ids_BxL, positions_BxL, deterministic: bool):
    cfg = self.config
    word_VxE = self.param('word_embeddings', layers.init(cfg.initializer_range, ('vocab', 'embed')),
                          (cfg.vocab_size, cfg.embed_dim), cfg.param_dtype)
    type_TxE = self.param('token_type_embeddings', layers.init(cfg.initializer_range, ('type', 'embed')),
                          (cfg.type_vocab_size, cfg.embed_dim), cfg.param_dtype)
    x_BxLxE = (layers.lookup(word_VxE, ids_BxL, 'vocab', cfg.dtype)
               + layers.lookup(type_TxE, type_ids_BxL, 'type', cfg.dtype))
    pe = registry.parse(cfg.attention).position_embedding
    module = pe.build(cfg, name='position_embeddings') if pe is not None else None
    if module is not None:
      x_BxLxE = x_BxLxE + module(positions_BxL)
    x_BxLxE = _norm(cfg, 'norm')(x_BxLxE)
    x_BxLxE = nn.Dropout(cfg.hidden_dropout)(x_BxLxE, deterministic=deterministic)
    return x_BxLxE, word_VxE


class GroupedDense(nn.Module):
  """A dense layer, or ConvBERT's grouped linear layer when `ffn_groups` = G > 1: the inputs split into G
  groups, each with its own (in/G, out/G) matrix (kernel GxIgxOg); the bias spans all outputs."""
  config: ModelConfig
  features: int
  names: tuple[str, str]

  @nn.compact
  def __call__(self, x_BxLxI):
    cfg, g = self.config, self.config.ffn_groups
    n_in = x_BxLxI.shape[-1]
    b_O = self.param('bias', layers.zeros(self.names[1:]), (self.features,), cfg.param_dtype)
    x = x_BxLxI.astype(cfg.dtype)
    if g == 1:
      w_IxO = self.param('kernel', layers.init(cfg.initializer_range, self.names), (n_in, self.features),
                         cfg.param_dtype)
      return x @ jnp.asarray(w_IxO, cfg.dtype) + jnp.asarray(b_O, cfg.dtype)
    w_GxIgxOg = self.param('kernel', layers.init(cfg.initializer_range, ('groups',) + self.names),
                           (g, n_in // g, self.features // g), cfg.param_dtype)
    y = jnp.einsum('blgi,gio->blgo', x.reshape(*x.shape[:-1], g, n_in // g),
                   jnp.asarray(w_GxIgxOg, cfg.dtype))
    return y.reshape(*y.shape[:-2], self.features) + jnp.asarray(b_O, cfg.dtype)


class Layer(nn.Module):
  """Post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

  With `rows_BxR` the layer returns only those rows (BxRxD): attention still reads the whole sequence, but
  the output projection, residuals and feed-forward, which act token by token, run on R rows.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxL, deterministic: bool, rows_BxR=None):
    cfg = self.config
    drop = lambda y: nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)  # noqa: E731
    y_BxLxD = MultiHeadAttention(cfg, name='attention')(x_BxLxD, mask_BxL, deterministic, rows_BxR)
    if rows_BxR is not None:
      x_BxLxD = layers.take_rows(x_BxLxD, rows_BxR)
    x_BxLxD = _norm(cfg, 'attention_norm')(x_BxLxD + drop(y_BxLxD))
    h_BxLxF = GroupedDense(cfg, cfg.intermediate_size, ('embed', 'mlp'), name='intermediate')(x_BxLxD)
    h_BxLxF = layers.activation(cfg.hidden_act)(h_BxLxF)
    y_BxLxD = GroupedDense(cfg, cfg.hidden_size, ('mlp', 'embed'), name='output')(h_BxLxF)
    return _norm(cfg, 'output_norm')(x_BxLxD + drop(y_BxLxD))


_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'everything_saveable': jax.checkpoint_policies.everything_saveable,
}


def _layer_class(cfg: ModelConfig):
  if cfg.remat_policy == 'none':
    return Layer
  # static_argnums counts `self`: (self, x, mask, deterministic, rows).
  return nn.remat(Layer, policy=_POLICIES[cfg.remat_policy], static_argnums=(3,))


class _Block(nn.Module):
  """The inner layers of one group (one layer unless ALBERT's inner_group_size > 1), as a scan body."""
  config: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxL):
    cls = _layer_class(self.config)
    for j in range(layer_groups(self.config)[2]):
      x_BxLxD = cls(self.config, name=f'layer_{j}')(x_BxLxD, mask_BxL, self.deterministic)
    return x_BxLxD, None


class _Group(nn.Module):
  """One parameter group applied `repeats` times (ALBERT shares it across num_layers / layer_groups
  consecutive steps: a scan with broadcast parameters, so depth does not unroll)."""
  config: ModelConfig
  deterministic: bool
  repeats: int

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxL):
    if self.repeats == 1:
      return _Block(self.config, self.deterministic, name='block')(x_BxLxD, mask_BxL)
    repeated = nn.scan(_Block, variable_broadcast='params', split_rngs={'params': False, 'dropout': True},
                       in_axes=nn.broadcast, length=self.repeats)
    return repeated(self.config, self.deterministic, name='block')(x_BxLxD, mask_BxL)


def layer_groups(cfg: ModelConfig) -> tuple[int, int, int]:
  """(distinct parameter groups G, steps per group, layers per group): (num_layers, 1, 1) for BERT, ALBERT's
  (layer_groups, num_layers // layer_groups, inner_group_size)."""
  if not cfg.layer_groups:
    return cfg.num_layers, 1, 1
  return cfg.layer_groups, cfg.num_layers // cfg.layer_groups, cfg.inner_group_size


class Encoder(nn.Module):
  """`num_layers` layers. With `layer_groups` = G > 0 (ALBERT) only G * inner_group_size distinct layers
  exist; step i of num_layers runs group i // (num_layers / G), i.e. all of its inner layers, as HF's
  AlbertTransformer does.

  Parameters: `layer_{k}` per distinct layer, or with `scan_layers` one stack `layers/block/layer_{j}`
  (j < inner_group_size) whose leaves carry a leading axis of the G groups (logical name `layers`).

  `rows_BxR`: return only those rows (BxRxD). The unrolled encoder runs its last layer's token-wise parts on
  them alone; the scanned one (every step the same computation) runs in full and gathers them at the end.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxL, deterministic: bool, rows_BxR=None):
    cfg = self.config
    groups, per_group, inner = layer_groups(cfg)
    if cfg.scan_layers:
      scanned = nn.scan(_Group, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                        in_axes=nn.broadcast, length=groups, metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxLxD, _ = scanned(cfg, deterministic, per_group, name='layers')(x_BxLxD, mask_BxL)
      return x_BxLxD if rows_BxR is None else layers.take_rows(x_BxLxD, rows_BxR)
    cls = _layer_class(cfg)
    distinct = [cls(cfg, name=f'layer_{k}') for k in range(groups * inner)]
    for i in range(cfg.num_layers):
      group = i // per_group
      for j in range(inner):
        last = i == cfg.num_layers - 1 and j == inner - 1
        x_BxLxD = distinct[group * inner + j](x_BxLxD, mask_BxL, deterministic, rows_BxR if last else None)
    return x_BxLxD


class MLMHead(nn.Module):
  """dense (D -> E) -> act -> LN -> logits against the tied word embeddings VxE, plus a bias."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, word_VxE):
    cfg = self.config
    x_BxLxE = _dense(cfg, cfg.embed_dim, ('embed', 'embed_out'), 'transform')(x_BxLxD)
    x_BxLxE = layers.activation(cfg.mlm_head_act or cfg.hidden_act)(x_BxLxE)
    x_BxLxE = _norm(cfg, 'norm')(x_BxLxE)
    bias_V = self.param('bias', layers.zeros(('vocab',)), (cfg.vocab_size,), cfg.param_dtype)
    logits_BxLxV = jnp.einsum('ble,ve->blv', x_BxLxE, jnp.asarray(word_VxE, cfg.dtype))
    # broadcast_batch: the bias gradient, a column sum over B*L rows of V=30522, as a ones-vector product
    # (XLA CPU's own reduce of it was 9 ms of the BERT-base L128 step, 0.3 ms this way).
    b, l, v = logits_BxLxV.shape
    return logits_BxLxV + layers.broadcast_batch(jnp.asarray(bias_V, cfg.dtype)[None], b * l).reshape(b, l, v)


class Bert(nn.Module):
  """A BERT-family encoder with the heads its config asks for.

  Inputs: `ids_BxL` token ids, `mask_BxL` (True/1 at real tokens; default: ids != pad), `type_ids_BxL`
  (default zeros), `positions_BxL` (default 0..L-1), `mlm_positions_BxP` (the positions to predict; default
  all). Returns a dict with `hidden_BxLxD` and, as configured, `mlm_logits_BxLxV` (BxPxV when positions are
  given), `pooled_BxD`, `sentence_logits_Bx2` (NSP/SOP) and `discriminator_logits_BxL` (ELECTRA).

  `only_predicted_rows=True`: the last layer computes its output projection and feed-forward only at [CLS]
  and the P predicted positions (`mlm_positions_BxP`; needed with an MLM head), all that the MLM, pooled and
  classification heads read, and the dict has `hidden_BxRxD` (R = 1 + P: [CLS], then those positions)
  instead of `hidden_BxLxD`. The heads' outputs are unchanged; for BERT-base this skips ~6% of the encoder's
  FLOPs in pretraining (15% masking) and in fine-tuning a classifier (R = 1). Not with a discriminator
  head, which reads every position.

  `shared_embeddings`: an `Embeddings` module owned by a parent, so two encoders (ELECTRA's generator and
  discriminator) use one set of embedding parameters.
  """
  config: ModelConfig
  shared_embeddings: nn.Module | None = None

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL=None, type_ids_BxL=None, positions_BxL=None,
               mlm_positions_BxP=None, deterministic: bool = True, only_predicted_rows: bool = False):
    cfg = self.config
    rows_BxR = None
    if only_predicted_rows:
      if cfg.discriminator_head or (cfg.mlm_head and mlm_positions_BxP is None):
        raise ValueError('only_predicted_rows needs a model without a discriminator head (which reads every '
                         'position) and, with an MLM head, mlm_positions_BxP')
      rows_BxR = jnp.zeros((ids_BxL.shape[0], 1), jnp.int32)  # [CLS]
      if mlm_positions_BxP is not None:
        rows_BxR = jnp.concatenate([rows_BxR, mlm_positions_BxP.astype(jnp.int32)], axis=1)
    if mask_BxL is None:
      mask_BxL = ids_BxL != cfg.pad_token_id
    mask_BxL = mask_BxL.astype(bool)
    if type_ids_BxL is None:
      type_ids_BxL = jnp.zeros_like(ids_BxL)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)
    embed = self.shared_embeddings or Embeddings(cfg, name='embeddings')
    x, word_VxE = embed(ids_BxL, type_ids_BxL, positions_BxL, deterministic)
    if cfg.embedding_size:
      x = _dense(cfg, cfg.hidden_size, ('embed_out', 'embed'), 'embedding_projection')(x)
    x_BxLxD = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    x_BxLxD = Encoder(cfg, name='encoder')(x_BxLxD, mask_BxL, deterministic, rows_BxR)
    out = {'hidden_BxLxD' if rows_BxR is None else 'hidden_BxRxD': x_BxLxD}
    if cfg.mlm_head:
      # Pretraining predicts only the masked positions: gathering them first makes the vocabulary-sized
      # matmul ~7x smaller at 15% masking.
      if rows_BxR is not None:
        mlm_in = x_BxLxD[:, 1:]
      elif mlm_positions_BxP is not None:
        mlm_in = layers.take_rows(x_BxLxD, mlm_positions_BxP)
      else:
        mlm_in = x_BxLxD
      out['mlm_logits_BxLxV'] = MLMHead(cfg, name='mlm_head')(mlm_in, word_VxE)
    if cfg.pooler:
      out['pooled_BxD'] = jnp.tanh(_dense(cfg, cfg.hidden_size, ('embed', 'embed_out'), 'pooler')(
          x_BxLxD[:, 0]))
    if cfg.sentence_head:
      pooled = nn.Dropout(cfg.hidden_dropout)(out['pooled_BxD'], deterministic=deterministic)
      out['sentence_logits_Bx2'] = _dense(cfg, 2, ('embed', 'classes'), 'sentence_head')(pooled)
    if cfg.discriminator_head:
      h_BxLxD = _dense(cfg, cfg.hidden_size, ('embed', 'embed_out'), 'discriminator_dense')(x_BxLxD)
      h_BxLxD = layers.activation(cfg.hidden_act)(h_BxLxD)
      out['discriminator_logits_BxL'] = _dense(cfg, 1, ('embed_out', 'classes'), 'discriminator_out')(h_BxLxD)[
          ..., 0]
    return out
