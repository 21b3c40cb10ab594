"""Hugging Face BERT <-> posjax: `import_bert(dir)` and `export_bert(config, params, dir)`.

Reads `BertModel`, `BertForMaskedLM` and `BertForPreTraining` checkpoints (config.json + safetensors, or
pytorch_model.bin through `torch.load(weights_only=True)`); writes `BertForMaskedLM` directories that
transformers loads with `from_pretrained`. The pooler is exported too (transformers' BertModel uses it).
"""

from __future__ import annotations

import jax
import numpy as np

from posjax.attention import registry
from posjax.config import ModelConfig
from posjax.convert import hf
from posjax.convert.hf import Entry
from posjax.errors import ConfigError
from posjax.models import Bert, layout

# HF position_embedding_type -> posjax attention variant.
_POSITION_TYPES = {'absolute': 'absolute', 'relative_key': 'relative_key',
                   'relative_key_query': 'relative_key_query'}
_IGNORED = ('bert.embeddings.position_ids', 'cls.predictions.decoder.weight', 'cls.predictions.decoder.bias')


def config_from_hf(hfc: dict) -> ModelConfig:
  if hfc.get('model_type') != 'bert':
    raise ConfigError(f'expected a BERT checkpoint (model_type "bert"); config.json says '
                      f'{hfc.get("model_type")!r} (architectures {hfc.get("architectures")})')
  pet = hfc.get('position_embedding_type', 'absolute')
  if pet not in _POSITION_TYPES:
    raise ConfigError(f'position_embedding_type {pet!r} is not one of {", ".join(_POSITION_TYPES)}')
  return ModelConfig(
      **hf.shared_from_hf(hfc), attention=_POSITION_TYPES[pet],
      attention_options=(('max_relative_position', hfc['max_position_embeddings']),) if pet != 'absolute'
      else ())


def config_to_hf(cfg: ModelConfig) -> dict:
  pet = {v: k for k, v in _POSITION_TYPES.items()}.get(cfg.attention)
  if pet is None:
    raise ConfigError(f'attention variant {cfg.attention!r} has no Hugging Face BERT equivalent; exportable: '
                      f'{", ".join(_POSITION_TYPES.values())}')
  hf.check_exportable(cfg, 'BERT', factorised=False, shared_layers=False, ffn_groups=False,
                      mlm_head_act=cfg.hidden_act)
  max_positions = cfg.max_position_embeddings
  if pet != 'absolute':
    if cfg.option('relative_scaled') is not True:
      raise ConfigError('attention option relative_scaled=False (ALBERT convention) has no Hugging Face BERT '
                        'equivalent; only relative_scaled=True is exportable')
    # HF sizes the distance table from max_position_embeddings (2M-1 rows).
    max_positions = cfg.option('max_relative_position')
  return {**hf.shared_to_hf(cfg), 'architectures': ['BertForMaskedLM'], 'model_type': 'bert',
          'max_position_embeddings': max_positions, 'position_embedding_type': pet}


def embedding_entries(cfg: ModelConfig, prefix: str) -> list[Entry]:
  """BERT-style embeddings (also ELECTRA's and ConvBERT's) under `prefix` (e.g. 'bert.')."""
  e = [Entry(('embeddings', 'word_embeddings'), prefix + 'embeddings.word_embeddings.weight'),
       Entry(('embeddings', 'token_type_embeddings'), prefix + 'embeddings.token_type_embeddings.weight')]
  pe = registry.parse(cfg.attention).position_embedding
  if pe is not None and pe.name == 'absolute':
    e.append(Entry(('embeddings', 'position_embeddings', 'embedding'),
                   prefix + 'embeddings.position_embeddings.weight'))
  return e + hf.norm(('embeddings', 'norm'), prefix + 'embeddings.LayerNorm')


def layer_entries(cfg: ModelConfig, i: int, theirs: str, attention=None) -> list[Entry]:
  """One BERT-style layer `theirs` (e.g. 'bert.encoder.layer.3.') -> posjax encoder/layer_i.

  `attention(ours_path, theirs_prefix)` maps the attention module when it is not BERT's (ConvBERT's)."""
  ours = ('encoder', f'layer_{i}')
  att = ours + ('attention',)
  if attention is not None:
    e = attention(att, theirs + 'attention.')
  else:
    e = []
    for name in ('query', 'key', 'value'):
      e += hf.linear(att + (name,), theirs + f'attention.self.{name}')
    if cfg.attention in ('relative_key', 'relative_key_query'):
      e.append(Entry(att + (cfg.attention, 'distance_embedding'),
                     theirs + 'attention.self.distance_embedding.weight'))
    e += hf.linear(att + ('out',), theirs + 'attention.output.dense', n_in=2)
  e += hf.norm(ours + ('attention_norm',), theirs + 'attention.output.LayerNorm')
  e += hf.linear(ours + ('intermediate',), theirs + 'intermediate.dense')
  e += hf.linear(ours + ('output',), theirs + 'output.dense')
  return e + hf.norm(ours + ('output_norm',), theirs + 'output.LayerNorm')


def entries(cfg: ModelConfig, prefix: str = 'bert.') -> list[Entry]:
  e = embedding_entries(cfg, prefix)
  for i in range(cfg.num_layers):
    e += layer_entries(cfg, i, f'{prefix}encoder.layer.{i}.')
  e += hf.linear(('pooler',), prefix + 'pooler.dense', optional=True)
  e += hf.linear(('mlm_head', 'transform'), 'cls.predictions.transform.dense')
  e += hf.norm(('mlm_head', 'norm'), 'cls.predictions.transform.LayerNorm')
  e.append(Entry(('mlm_head', 'bias'), 'cls.predictions.bias'))
  return e


def import_bert(directory: str, seed: int = 0):
  """(ModelConfig, params) from a HF BERT checkpoint directory.

  Weights a checkpoint does not hold (the pooler of BertForMaskedLM, the MLM head of BertModel) keep a fresh
  initialisation from `seed` and are named in a warning; any other missing or mis-shaped weight is an error.
  """
  hfc = hf.read_config(directory)
  cfg = config_from_hf(hfc)
  state = hf.read_state(directory)
  prefix = 'bert.' if any(k.startswith('bert.') for k in state) else ''
  table = entries(cfg, prefix)
  if not any(k.startswith('cls.') for k in state):  # a bare BertModel: no MLM head
    table = hf.optional(table, ('cls.',))
  # HF's relative BERT keeps an absolute position table it never uses.
  ignored = _IGNORED + (
      (prefix + 'embeddings.position_embeddings.weight',) if cfg.attention != 'absolute' else ())
  return cfg, hf.import_checkpoint(directory, table, hf.init_params(Bert(cfg), seed), state, ignored,
                                   'posjax BERT')


def export_bert(cfg: ModelConfig, params, directory: str) -> None:
  """Writes a `BertForMaskedLM` checkpoint (config.json + model.safetensors) that transformers can load."""
  cfg, params = layout.unrolled(cfg, params)  # scan_layers is a training-time layout
  hfc = config_to_hf(cfg)
  state = hf.extract(entries(cfg), jax.device_get(params))
  if cfg.attention != 'absolute':
    # HF's relative BERT still holds an (unused) absolute table; zeros keep from_pretrained from warning.
    state['bert.embeddings.position_embeddings.weight'] = np.zeros(
        (hfc['max_position_embeddings'], cfg.hidden_size), np.float32)
  hf.write(directory, hfc, state)
