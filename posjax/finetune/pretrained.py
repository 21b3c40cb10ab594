"""Load what fine-tuning starts from: a posjax pretraining workdir or a Hugging Face checkpoint directory.

A directory with `config.json` is a Hugging Face checkpoint, dispatched on its `model_type` (bert, albert,
electra, convbert); one with `checkpoints/` is a posjax workdir (its latest checkpoint and its
`tokenizer.json`). An ELECTRA/ConvBERT pretraining run fine-tunes its discriminator, as ELECTRA does.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import numpy as np
import orbax.checkpoint as ocp

from posjax.config import ModelConfig
from posjax.data import tokenizer as tokenizer_lib
from posjax.errors import ConfigError

HF_MODEL_TYPES = ('bert', 'albert', 'electra', 'convbert')


@dataclasses.dataclass
class Pretrained:
  config: ModelConfig
  params: dict  # NumPy arrays, the Bert module's tree
  tokenizer: object
  source: str  # 'posjax workdir DIR (step N)' or 'Hugging Face MODEL_TYPE checkpoint DIR'
  max_seq_len: int = 0  # the pretraining sequence length when known (posjax workdirs)
  run_config: dict = dataclasses.field(default_factory=dict)  # posjax workdirs: the config it was trained with
  mlm: tuple | None = None  # (config, params) of the part with an MLM head (ELECTRA: the generator)


def _tokenizer(path: str, override: str, what: str):
  if override:
    return tokenizer_lib.load(override)
  for name in ('tokenizer.json', 'vocab.txt'):
    if os.path.exists(os.path.join(path, name)):
      return tokenizer_lib.load(os.path.join(path, name))
  raise ConfigError(f'{what} {path!r} has neither tokenizer.json nor vocab.txt; point --config.tokenizer at '
                    'the tokenizer it was trained with')


def load_hf(path: str, tokenizer: str = '') -> Pretrained:
  from posjax.convert import hf, hf_albert, hf_bert, hf_electra  # pylint: disable=g-import-not-at-top
  model_type = hf.read_config(path).get('model_type')
  importers = {'bert': hf_bert.import_bert, 'albert': hf_albert.import_albert,
               'electra': hf_electra.import_electra, 'convbert': hf_electra.import_electra}
  if model_type not in importers:
    raise ConfigError(f'{os.path.join(path, "config.json")}: model_type {model_type!r} cannot be fine-tuned '
                      f'here; supported: {", ".join(HF_MODEL_TYPES)}')
  tok = _tokenizer(path, tokenizer, 'Hugging Face checkpoint')
  source = f'Hugging Face {model_type} checkpoint {path}'
  check_vocab(hf.read_config(path).get('vocab_size'), tok, source)  # before reading any weights
  try:
    cfg, params = importers[model_type](path)
  except KeyError as e:  # the importers read config.json's fields by name
    if e.args[0] in hf.read_config(path):
      raise
    raise ConfigError(f'{os.path.join(path, "config.json")}: no field {e.args[0]!r}, which a {model_type} '
                      'config needs') from None
  return Pretrained(cfg, params, tok, source)


def check_vocab(model_vocab, tok, source: str) -> None:
  """The model's embedding table must be the tokenizer's size, or that size padded as posjax pads it."""
  from posjax.training import loop  # pylint: disable=g-import-not-at-top
  vocab = tok.get_vocab_size()
  if model_vocab not in (vocab, loop.padded_vocab(vocab)):
    raise ConfigError(f'{source}: the model\'s vocabulary has {model_vocab} tokens but the tokenizer has '
                      f'{vocab}; they must match (set --config.tokenizer to the tokenizer the model was '
                      'pretrained with)')


def restore_raw(workdir: str):
  """(step, meta, params) of a posjax workdir's latest readable checkpoint, without knowing its optimiser."""
  from posjax.training import checkpoint  # pylint: disable=g-import-not-at-top
  mngr = checkpoint.manager(workdir, 1_000_000)  # a large max_to_keep: reading must never delete
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore(), state=ocp.args.StandardRestore()))
      except Exception as e:  # pylint: disable=broad-except  (a damaged checkpoint: try the previous one)
        logging.warning('checkpoint %d in %s is unreadable (%s); trying the previous one', step, workdir,
                        type(e).__name__)
        continue
      params = restored['state']['params']
      return step, restored['meta'], jax_to_numpy(params)
  finally:
    mngr.close()
  raise ConfigError(f'posjax workdir {workdir!r} has no readable checkpoint in {workdir}/checkpoints')


def jax_to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(np.asarray, tree)


def load_posjax(workdir: str, tokenizer: str = '') -> Pretrained:
  tok = _tokenizer(workdir, tokenizer, 'posjax workdir')
  step, meta, params = restore_raw(workdir)
  model = dict(meta['model'])
  source = f'posjax workdir {workdir} (step {step}, objective {model.get("objective", "mlm")})'
  check_vocab(model.get('vocab_size'), tok, source)
  objective = model.pop('objective', 'mlm')
  cfg = ModelConfig.from_dict(model)
  run_config = meta.get('config', {})
  if objective == 'electra':
    from posjax.convert import hf_electra  # pylint: disable=g-import-not-at-top
    fraction = run_config.get('electra', {}).get('generator_fraction', 0.25)
    mlm, (cfg, params) = hf_electra.split_pretrainer(cfg, params, fraction)
  else:
    cfg = dataclasses.replace(cfg, mlm_head=True, pooler=True, sentence_head=objective != 'mlm')
    mlm = (cfg, params)
  seq_len = run_config.get('data', {}).get('seq_len', 0)
  return Pretrained(cfg, params, tok, source, int(seq_len or 0), run_config, mlm)


def load(path: str, tokenizer: str = '') -> Pretrained:
  """From `init_from`: an HF checkpoint directory (config.json) or a posjax workdir (checkpoints/)."""
  if not path:
    raise ConfigError('init_from is empty: set --config.init_from to a posjax pretraining workdir or a '
                      'Hugging Face checkpoint directory (BERT, ALBERT, ELECTRA, ConvBERT)')
  if not os.path.isdir(path):
    raise ConfigError(f'init_from {path!r} is not a directory')
  if os.path.exists(os.path.join(path, 'config.json')):
    pre = load_hf(path, tokenizer)
  elif os.path.isdir(os.path.join(path, 'checkpoints')):
    pre = load_posjax(path, tokenizer)
  else:
    raise ConfigError(f'init_from {path!r} is neither a Hugging Face checkpoint (no config.json) nor a posjax '
                      'workdir (no checkpoints/)')
  return pre
