"""Open a trained model: a posjax pretraining workdir or a Hugging Face checkpoint directory. What fine-tuning
starts from (`init_from`), what `posjax.analysis` and length extrapolation read.

A directory with `checkpoints/` is a posjax workdir (it holds the trainer's config.json too); any other with
`config.json` is a Hugging Face checkpoint, dispatched on its `model_type` (bert, albert, electra,
convbert). A posjax workdir gives its latest checkpoint, read and verified by
the same code as a resume (`training.checkpoint.read`: a damaged one is skipped for the previous with a
warning), and its `tokenizer.json`. An ELECTRA/ConvBERT pretraining run gives its discriminator as the
encoder, as ELECTRA fine-tunes it, and its generator as the part with an MLM head.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
from posjax.config import ModelConfig, padded_vocab
from posjax.data import tokenizer as tokenizer_lib
from posjax.errors import ConfigError

HF_MODEL_TYPES = ('bert', 'albert', 'electra', 'convbert')


@dataclasses.dataclass
class Pretrained:
  config: ModelConfig
  params: dict  # NumPy arrays, the Bert module's tree
  tokenizer: object
  source: str  # 'posjax workdir DIR (step N)' or 'Hugging Face MODEL_TYPE checkpoint DIR'
  kind: str = 'posjax'  # 'posjax' or 'hf:MODEL_TYPE'
  step: int | None = None  # posjax workdirs: the checkpoint's step
  seq_len: int = 0  # the pretraining sequence length when known (posjax workdirs)
  run_config: dict = dataclasses.field(default_factory=dict)  # posjax workdirs: the config it was trained with
  mlm: tuple | None = None  # (config, params) of the part with an MLM head (ELECTRA: the generator)


def _tokenizer(path: str, override: str, what: str, required: bool = True):
  if override:
    return tokenizer_lib.load(override)
  for name in ('tokenizer.json', 'vocab.txt'):
    if os.path.exists(os.path.join(path, name)):
      return tokenizer_lib.load(os.path.join(path, name))
  if not required:
    return None
  raise ConfigError(f'{what} {path!r} has neither tokenizer.json nor vocab.txt; point --config.tokenizer at '
                    'the tokenizer it was trained with')


def load_hf(path: str, tokenizer: str = '', need_tokenizer: bool = True) -> Pretrained:
  from posjax.convert import hf, hf_albert, hf_bert, hf_electra  # pylint: disable=g-import-not-at-top
  model_type = hf.read_config(path).get('model_type')
  importers = {'bert': hf_bert.import_bert, 'albert': hf_albert.import_albert,
               'electra': hf_electra.import_electra, 'convbert': hf_electra.import_electra}
  if model_type not in importers:
    raise ConfigError(f'{os.path.join(path, "config.json")}: model_type {model_type!r} cannot be fine-tuned '
                      f'here; supported: {", ".join(HF_MODEL_TYPES)}')
  tok = _tokenizer(path, tokenizer, 'Hugging Face checkpoint', need_tokenizer)
  source = f'Hugging Face {model_type} checkpoint {path}'
  if tok is not None:
    check_vocab(hf.read_config(path).get('vocab_size'), tok, source)  # before reading any weights
  try:
    cfg, params = importers[model_type](path)
  except KeyError as e:  # the importers read config.json's fields by name
    if e.args[0] in hf.read_config(path):
      raise
    raise ConfigError(f'{os.path.join(path, "config.json")}: no field {e.args[0]!r}, which a {model_type} '
                      'config needs') from None
  return Pretrained(cfg, jax_to_numpy(params), tok, source, kind=f'hf:{model_type}')


def check_vocab(model_vocab, tok, source: str) -> None:
  """The model's embedding table must be the tokenizer's size, or that size padded as posjax pads it."""
  vocab = tok.get_vocab_size()
  if model_vocab not in (vocab, padded_vocab(vocab)):
    raise ConfigError(f'{source}: the model\'s vocabulary has {model_vocab} tokens but the tokenizer has '
                      f'{vocab}; they must match (set --config.tokenizer to the tokenizer the model was '
                      'pretrained with)')


def jax_to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(np.asarray, tree)


def load_posjax(workdir: str, tokenizer: str = '', step: int | None = None,
                need_tokenizer: bool = True) -> Pretrained:
  from posjax.training import checkpoint  # pylint: disable=g-import-not-at-top
  tok = _tokenizer(workdir, tokenizer, 'posjax workdir', need_tokenizer)
  step, meta, params = checkpoint.read(workdir, step)
  model = dict(meta['model'])
  if 'task' in model:  # fine-tuning's checkpoints hold a classifier, not a pretrained model
    init_from = meta.get('config', {}).get('init_from') or 'its init_from'
    raise ConfigError(f'{workdir} is a fine-tuning workdir ({model["task"]} classifier); give the pretraining '
                      f'run it started from ({init_from})')
  source = f'posjax workdir {workdir} (step {step}, objective {model.get("objective", "mlm")})'
  if tok is not None:
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
  return Pretrained(cfg, params, tok, source, 'posjax', step, int(seq_len or 0), run_config, mlm)


def load(path: str, tokenizer: str = '', step: int | None = None, need_tokenizer: bool = True,
         what: str = 'init_from') -> Pretrained:
  """An HF checkpoint directory (config.json) or a posjax workdir (checkpoints/; `step`: that checkpoint
  instead of the latest). `what` names the argument in errors."""
  if not path:
    raise ConfigError(f'{what} is empty: give a posjax pretraining workdir or a Hugging Face checkpoint '
                      'directory (BERT, ALBERT, ELECTRA, ConvBERT)')
  if not os.path.isdir(path):
    raise ConfigError(f'{what} {path!r} is not a directory')
  # A posjax workdir holds a config.json too (the trainer's resolved config): checkpoints/ decides first.
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return load_posjax(path, tokenizer, step, need_tokenizer)
  if os.path.exists(os.path.join(path, 'config.json')):
    if step is not None:
      raise ConfigError(f'{what} {path!r} is a Hugging Face checkpoint: it has no steps to choose from')
    return load_hf(path, tokenizer, need_tokenizer)
  raise ConfigError(f'{what} {path!r} is neither a Hugging Face checkpoint (no config.json) nor a posjax '
                    'workdir (no checkpoints/)')
