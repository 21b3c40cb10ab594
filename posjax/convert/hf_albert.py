"""Hugging Face ALBERT <-> posjax: `import_albert(dir)` and `export_albert(config, params, dir)`.

Reads `AlbertModel`, `AlbertForMaskedLM` and `AlbertForPreTraining` checkpoints and writes
`AlbertForPreTraining` ones (`AlbertForMaskedLM` for a model without the sentence-order head). ALBERT's layer
groups map to posjax's shared layers (`layer_groups`, `inner_group_size`); its relative position terms are
added after scaling (`relative_scaled=False`).
"""

from __future__ import annotations

import jax

from posjax.config import ModelConfig
from posjax.convert import hf
from posjax.convert.hf import Entry
from posjax.errors import ConfigError
from posjax.models import Bert, layout

_POSITION_TYPES = ('absolute', 'relative_key', 'relative_key_query')
_IGNORED = ('albert.embeddings.position_ids', 'predictions.decoder.weight', 'predictions.decoder.bias')


def config_from_hf(hfc: dict) -> ModelConfig:
  if hfc.get('model_type') != 'albert':
    raise ConfigError(f'expected an ALBERT checkpoint (model_type "albert"); config.json says '
                      f'{hfc.get("model_type")!r} (architectures {hfc.get("architectures")})')
  pet = hfc.get('position_embedding_type', 'absolute')
  if pet not in _POSITION_TYPES:
    raise ConfigError(f'position_embedding_type {pet!r} is not one of {", ".join(_POSITION_TYPES)}')
  options = ()
  if pet != 'absolute':
    options = (('max_relative_position', hfc['max_position_embeddings']), ('relative_scaled', False))
  return ModelConfig(
      **hf.shared_from_hf(hfc), attention=pet, attention_options=options, embedding_size=hfc['embedding_size'],
      layer_groups=hfc['num_hidden_groups'], inner_group_size=hfc['inner_group_num'], sentence_head=True)


def config_to_hf(cfg: ModelConfig) -> dict:
  if cfg.attention not in _POSITION_TYPES:
    raise ConfigError(f'attention variant {cfg.attention!r} has no Hugging Face ALBERT equivalent; '
                      f'exportable: {", ".join(_POSITION_TYPES)}')
  if cfg.attention != 'absolute' and cfg.option('relative_scaled') is not False:
    raise ConfigError('HF ALBERT adds relative terms after scaling: export needs relative_scaled=False')
  if not cfg.embedding_size or not cfg.layer_groups:
    raise ConfigError('an ALBERT export needs model.embedding_size > 0 and model.layer_groups > 0')
  hf.check_exportable(cfg, 'ALBERT', factorised=True, shared_layers=True, ffn_groups=False,
                      mlm_head_act=cfg.hidden_act)
  max_positions = cfg.max_position_embeddings
  if cfg.attention != 'absolute':
    max_positions = cfg.option('max_relative_position')
  return {**hf.shared_to_hf(cfg), 'model_type': 'albert',
          'architectures': ['AlbertForPreTraining' if cfg.sentence_head else 'AlbertForMaskedLM'],
          'embedding_size': cfg.embedding_size, 'num_hidden_groups': cfg.layer_groups,
          'inner_group_num': cfg.inner_group_size, 'max_position_embeddings': max_positions,
          'classifier_dropout_prob': cfg.hidden_dropout, 'position_embedding_type': cfg.attention}


def entries(cfg: ModelConfig, heads: bool = True) -> list[Entry]:
  p = 'albert.'
  e = [Entry(('embeddings', 'word_embeddings'), p + 'embeddings.word_embeddings.weight'),
       Entry(('embeddings', 'token_type_embeddings'), p + 'embeddings.token_type_embeddings.weight')]
  if cfg.attention == 'absolute':
    e.append(Entry(('embeddings', 'position_embeddings', 'embedding'), p + 'embeddings.position_embeddings.weight'))
  e += hf.norm(('embeddings', 'norm'), p + 'embeddings.LayerNorm')
  e += hf.linear(('embedding_projection',), p + 'encoder.embedding_hidden_mapping_in')
  for g in range(cfg.layer_groups):
    for j in range(cfg.inner_group_size):
      ours = ('encoder', f'layer_{g * cfg.inner_group_size + j}')
      theirs = f'{p}encoder.albert_layer_groups.{g}.albert_layers.{j}.'
      att = ours + ('attention',)
      for name in ('query', 'key', 'value'):
        e += hf.linear(att + (name,), theirs + f'attention.{name}')
      if cfg.attention != 'absolute':
        e.append(Entry(att + (cfg.attention, 'distance_embedding'), theirs + 'attention.distance_embedding.weight'))
      e += hf.linear(att + ('out',), theirs + 'attention.dense', n_in=2)
      e += hf.norm(ours + ('attention_norm',), theirs + 'attention.LayerNorm')
      e += hf.linear(ours + ('intermediate',), theirs + 'ffn')
      e += hf.linear(ours + ('output',), theirs + 'ffn_output')
      e += hf.norm(ours + ('output_norm',), theirs + 'full_layer_layer_norm')
  e += hf.linear(('pooler',), p + 'pooler')
  # AlbertModel checkpoints have no heads; AlbertForMaskedLM no sentence-order head.
  e += hf.linear(('mlm_head', 'transform'), 'predictions.dense', optional=not heads)
  e += hf.norm(('mlm_head', 'norm'), 'predictions.LayerNorm', optional=not heads)
  e.append(Entry(('mlm_head', 'bias'), 'predictions.bias', optional=not heads))
  if cfg.sentence_head:
    e += hf.linear(('sentence_head',), 'sop_classifier.classifier', optional=True)
  return e


def import_albert(directory: str, seed: int = 0):
  """(ModelConfig, params) from a HF ALBERT checkpoint directory; weights it lacks (heads of AlbertModel,
  the SOP head of AlbertForMaskedLM) keep a fresh initialisation and are named in a warning."""
  hfc = hf.read_config(directory)
  cfg = config_from_hf(hfc)
  state = hf.read_state(directory)
  ignored = _IGNORED
  if cfg.attention != 'absolute':  # HF keeps an absolute table it never uses
    ignored += ('albert.embeddings.position_embeddings.weight',)
  table = entries(cfg, heads=any(k.startswith('predictions.') for k in state))
  return cfg, hf.import_checkpoint(directory, table, hf.init_params(Bert(cfg), seed), state, ignored,
                                   'posjax ALBERT')


def export_albert(cfg: ModelConfig, params, directory: str) -> None:
  """Writes an `AlbertForPreTraining` checkpoint (`AlbertForMaskedLM` without a sentence-order head) that
  transformers loads with from_pretrained."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  cfg, params = layout.unrolled(cfg, params)  # scan_layers is a training-time layout
  hfc = config_to_hf(cfg)
  state = hf.extract(entries(cfg), jax.device_get(params))
  if cfg.attention != 'absolute':
    state['albert.embeddings.position_embeddings.weight'] = np.zeros(
        (hfc['max_position_embeddings'], cfg.embedding_size), np.float32)
  hf.write(directory, hfc, state)
