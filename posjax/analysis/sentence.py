"""Attention probabilities of a sentence, per layer and head (the dot-product heads; ConvBERT's convolution
heads have none)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from posjax.analysis.positional import backbone
from posjax.config import ModelConfig
from posjax.models import Bert


def tokenize(tokenizer, text: str, max_len: int) -> tuple[np.ndarray, list[str]]:
  """[CLS] text [SEP] as ids and token strings, cut to max_len."""
  enc = tokenizer.encode(text, add_special_tokens=False)
  ids, tokens = list(enc.ids), list(enc.tokens)
  for tok, where in (('[CLS]', 0), ('[SEP]', len(ids) + 1)):
    i = tokenizer.token_to_id(tok)
    if i is not None:
      ids.insert(where, i)
      tokens.insert(where, tok)
  return np.asarray(ids[:max_len], np.int32), tokens[:max_len]


def attention_maps(cfg: ModelConfig, params, ids_L) -> list[np.ndarray]:
  """softmax attention of each of the num_layers layers (in the order they run, shared ALBERT layers once
  per use) as HxLxL arrays for one unpadded sequence `ids_L`."""
  encoder_only = dataclasses.replace(cfg, mlm_head=False, pooler=False, sentence_head=False,
                                     discriminator_head=False, hidden_dropout=0.0, attention_dropout=0.0)
  ids = jnp.asarray(np.asarray(ids_L, np.int32)[None])
  _, state = Bert(encoder_only).apply({'params': backbone(params)}, ids, jnp.ones_like(ids, bool),
                                      mutable=['intermediates'])
  sown = {name: list(v['attention']['probs_BxHxLxL'])
          for name, v in state['intermediates']['encoder'].items()}
  if not cfg.layer_groups:
    order = [f'layer_{i}' for i in range(cfg.num_layers)]
  else:
    per_group, inner = cfg.num_layers // cfg.layer_groups, cfg.inner_group_size
    order = [f'layer_{(i // per_group) * inner + j}' for i in range(cfg.num_layers) for j in range(inner)]
  return [np.asarray(sown[name].pop(0)[0], np.float64) for name in order]
