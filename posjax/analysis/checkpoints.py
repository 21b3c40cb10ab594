"""Open a model for analysis: a posjax training workdir (its latest orbax checkpoint) or a Hugging Face
checkpoint directory (BERT, ALBERT, ELECTRA, ConvBERT via `posjax.convert`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from posjax.config import ModelConfig
from posjax.errors import ConfigError


@dataclasses.dataclass
class Checkpoint:
  config: ModelConfig  # of the analysed encoder (an ELECTRA run: its discriminator's shapes)
  params: Any  # NumPy arrays; a `Bert` or an `ElectraPretrainer` tree (see positional.backbone)
  tokenizer: Any  # an HF `tokenizers.Tokenizer`, or None
  source: str  # 'posjax' or 'hf:<model_type>'
  step: int | None = None


def _tokenizer(path: str):
  from posjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  for name in ('tokenizer.json', 'vocab.txt'):
    if os.path.exists(os.path.join(path, name)):
      return tokenizer_lib.load(os.path.join(path, name))
  return None


def load_workdir(workdir: str, step: int | None = None) -> Checkpoint:
  """The latest (or `step`'s) checkpoint of a posjax workdir, restored on the host without a template."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  steps = mngr.all_steps()
  if not steps:
    raise ConfigError(f'{workdir!r} has no checkpoints under checkpoints/ (train first, or pass a Hugging Face '
                      'checkpoint directory with config.json)')
  step = max(steps) if step is None else step
  if step not in steps:
    raise ConfigError(f'{workdir!r} has no checkpoint at step {step}; it has {", ".join(map(str, steps))}')
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        meta=ocp.args.JsonRestore()))
  mngr.close()
  model = dict(restored['meta']['model'])
  model.pop('objective', None)
  params = jax.tree.map(np.asarray, restored['state']['params'])
  return Checkpoint(ModelConfig.from_dict(model), params, _tokenizer(workdir), 'posjax', step)


def load_hf(directory: str) -> Checkpoint:
  """Imports with posjax.convert (hf_bert, hf_albert, hf_electra for ELECTRA and ConvBERT)."""
  from posjax.convert import hf, hf_albert, hf_bert, hf_electra  # pylint: disable=g-import-not-at-top
  kind = hf.read_config(directory).get('model_type')
  importers = {'bert': hf_bert.import_bert, 'albert': hf_albert.import_albert,
               'electra': hf_electra.import_electra, 'convbert': hf_electra.import_electra}
  if kind not in importers:
    raise ConfigError(f'{directory}/config.json: model_type {kind!r} is not one of {", ".join(importers)}')
  cfg, params = importers[kind](directory)
  return Checkpoint(cfg, jax.tree.map(np.asarray, params), _tokenizer(directory), f'hf:{kind}')


def load(path: str) -> Checkpoint:
  """A posjax workdir (has checkpoints/) or a Hugging Face directory (has config.json)."""
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return load_workdir(path)
  if os.path.exists(os.path.join(path, 'config.json')):
    return load_hf(path)
  raise ConfigError(f'--checkpoint {path!r} is neither a posjax workdir (with checkpoints/) nor a Hugging Face '
                    'checkpoint directory (with config.json)')
