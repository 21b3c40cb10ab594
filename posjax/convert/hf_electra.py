"""Hugging Face ELECTRA and ConvBERT <-> posjax.

`import_electra(dir)` reads `ElectraModel`, `ElectraForPreTraining` (discriminator) and `ElectraForMaskedLM`
(generator) checkpoints, and `ConvBertModel` / `ConvBertForMaskedLM` ones (a ConvBERT discriminator head, where
present, uses ELECTRA's `discriminator_predictions.*` names). `export_electra(cfg, params, dir)` writes the
matching architecture. `split_pretrainer` turns the params of a posjax `ElectraPretrainer` into a generator
and a discriminator that each own a copy of the shared embeddings, ready to export.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from posjax.config import ModelConfig
from posjax.convert import hf, hf_bert, hf_convbert
from posjax.convert.hf import Copy, Entry
from posjax.errors import ConfigError
from posjax.models import Bert, layout
from posjax.models.electra import discriminator_config, generator_config

_TYPES = ('electra', 'convbert')


def config_from_hf(hfc: dict, heads: str) -> ModelConfig:
  """`heads`: 'discriminator', 'generator' or 'none' (a bare encoder)."""
  kind = hfc.get('model_type')
  if kind not in _TYPES:
    raise ConfigError(f'expected an ELECTRA or ConvBERT checkpoint (model_type "electra"/"convbert"); '
                      f'config.json says {kind!r} (architectures {hfc.get("architectures")})')
  pet = hfc.get('position_embedding_type', 'absolute')
  if pet != 'absolute':
    raise ConfigError(f'position_embedding_type {pet!r}: only "absolute" {kind} checkpoints are supported')
  num_heads, options = hfc['num_attention_heads'], {}
  attention = 'absolute'
  if kind == 'convbert':
    num_heads, options = hf_convbert.attention_layout(hfc)
    attention = 'absolute+convbert'
  e = hfc['embedding_size']
  return ModelConfig(
      **{**hf.shared_from_hf(hfc), 'num_heads': num_heads}, attention=attention,
      attention_options=tuple(sorted(options.items())),
      embedding_size=e if e != hfc['hidden_size'] else 0, ffn_groups=hfc.get('num_groups', 1),
      pooler=False, mlm_head=heads == 'generator', mlm_head_act='gelu' if heads == 'generator' else '',
      discriminator_head=heads == 'discriminator')


def _kind(cfg: ModelConfig) -> str:
  if cfg.attention == 'absolute':
    return 'electra'
  if cfg.attention == 'absolute+convbert':
    return 'convbert'
  raise ConfigError(f'attention variant {cfg.attention!r} has no Hugging Face ELECTRA/ConvBERT equivalent; '
                    'exportable: absolute (ELECTRA), absolute+convbert (ConvBERT)')


def entries(cfg: ModelConfig) -> list[Entry]:
  kind = _kind(cfg)
  p = kind + '.'
  e = hf_bert.embedding_entries(cfg, p)
  if cfg.embedding_size:
    e += hf.linear(('embedding_projection',), p + 'embeddings_project')
  attention = hf_convbert.attention_entries if kind == 'convbert' else None
  for i in range(cfg.num_layers):
    layer = hf_bert.layer_entries(cfg, i, f'{p}encoder.layer.{i}.', attention)
    if cfg.ffn_groups > 1:  # GroupedLinearLayer weights are already (G, in/G, out/G)
      layer = [dataclasses.replace(x, kind=Copy()) if x.key.endswith(('intermediate.dense.weight',
                                                                     'output.dense.weight'))
               and 'attention' not in x.key else x for x in layer]
    e += layer
  if cfg.mlm_head:
    e += hf.linear(('mlm_head', 'transform'), 'generator_predictions.dense')
    e += hf.norm(('mlm_head', 'norm'), 'generator_predictions.LayerNorm')
    e.append(Entry(('mlm_head', 'bias'), 'generator_lm_head.bias'))
  if cfg.discriminator_head:
    e += hf.linear(('discriminator_dense',), 'discriminator_predictions.dense')
    e += hf.linear(('discriminator_out',), 'discriminator_predictions.dense_prediction')
  return e


def _heads_of(state) -> str:
  if any(k.startswith('discriminator_predictions.') for k in state):
    return 'discriminator'
  if any(k.startswith('generator_predictions.') for k in state):
    return 'generator'
  return 'none'


def import_electra(directory: str, seed: int = 0):
  """(ModelConfig, params) from a HF ELECTRA or ConvBERT checkpoint directory; the heads follow the weights
  present (discriminator, generator MLM head, or none)."""
  hfc = hf.read_config(directory)
  state = hf.read_state(directory)
  prefix = f'{hfc.get("model_type")}.'
  if not any(k.startswith(prefix) for k in state):
    # A bare ElectraModel / ConvBertModel saves its weights without the base-model prefix.
    state = {prefix + k: v for k, v in state.items()}
  cfg = config_from_hf(hfc, _heads_of(state))
  word = f'{hfc["model_type"]}.embeddings.word_embeddings.weight'
  if 'generator_lm_head.weight' in state and word in state and not np.array_equal(
      state['generator_lm_head.weight'], state[word]):
    raise ConfigError(f'{directory}: generator_lm_head.weight differs from the word embeddings; posjax ties '
                      'them (tie_word_embeddings=True)')
  ignored = (f'{hfc["model_type"]}.embeddings.position_ids', f'{hfc["model_type"]}.embeddings.token_type_ids',
             'generator_lm_head.weight')
  params = hf.import_checkpoint(directory, entries(cfg), hf.init_params(Bert(cfg), seed), state, ignored,
                                f'posjax {hfc["model_type"]}')
  return cfg, params


def config_to_hf(cfg: ModelConfig) -> dict:
  kind = _kind(cfg)
  d = {**hf.shared_to_hf(cfg), 'model_type': kind, 'embedding_size': cfg.embed_dim,
       'position_embedding_type': 'absolute'}
  hf.check_exportable(cfg, {'electra': 'ELECTRA', 'convbert': 'ConvBERT'}[kind], factorised=True,
                      shared_layers=False, ffn_groups=kind == 'convbert', mlm_head_act='gelu')
  if kind == 'convbert':
    if cfg.option('convbert_head_ratio') != 2 or cfg.num_heads % 2:
      raise ConfigError(f'ConvBERT export needs attention option convbert_head_ratio=2 and an even '
                        f'model.num_heads (transformers splits the heads evenly); got '
                        f'{cfg.option("convbert_head_ratio")} and {cfg.num_heads}')
    d.update(head_ratio=2, conv_kernel_size=cfg.option('convbert_kernel_size'), num_groups=cfg.ffn_groups)
  name = {'electra': 'Electra', 'convbert': 'ConvBert'}[kind]
  if cfg.discriminator_head and kind == 'electra':
    d['architectures'] = ['ElectraForPreTraining']
  elif cfg.mlm_head:
    d['architectures'] = [f'{name}ForMaskedLM']
  else:
    d['architectures'] = [f'{name}Model']
  return d


def export_electra(cfg: ModelConfig, params, directory: str) -> None:
  """Writes ElectraForPreTraining / ElectraForMaskedLM / ElectraModel, or ConvBertForMaskedLM / ConvBertModel
  (a ConvBERT discriminator head is written under ELECTRA's names, which transformers' ConvBertModel
  ignores)."""
  cfg, params = layout.unrolled(cfg, params)  # scan_layers is a training-time layout
  state = hf.extract(entries(cfg), jax.device_get(params))
  if _kind(cfg) == 'convbert':
    state = hf_convbert.hf_conv_shapes(state)
  hf.write(directory, config_to_hf(cfg), state)


def split_pretrainer(cfg: ModelConfig, params, generator_fraction: float):
  """((generator config, params), (discriminator config, params)) from an ElectraPretrainer's params."""
  gen_cfg = generator_config(cfg, generator_fraction)
  disc_cfg = discriminator_config(cfg)
  gen = {**params['generator'], 'embeddings': params['embeddings']}
  disc = {**params['discriminator'], 'embeddings': params['embeddings']}
  return (gen_cfg, gen), (disc_cfg, disc)
