"""python -m posjax.convert.export RUN_DIR OUT_DIR [--step N]

Writes a posjax pretraining workdir as Hugging Face model directories that `AutoTokenizer`,
`AutoModelForMaskedLM` and `pipeline('fill-mask', ...)` load with no further step: the weights
(model.safetensors), config.json, the run's tokenizer (tokenizer.json, with BERT's [CLS] ... [SEP] template,
plus vocab.txt for WordPiece or spiece.model for SentencePiece), tokenizer_config.json and
special_tokens_map.json.

The model is picked from the run's config: BERT (`BertForMaskedLM`) and ALBERT (`AlbertForPreTraining`) runs
give one directory, OUT_DIR. ELECTRA and ConvBERT runs give two, as Google released ELECTRA:
OUT_DIR/generator (`ElectraForMaskedLM` / `ConvBertForMaskedLM`: the one for fill-mask) and
OUT_DIR/discriminator (`ElectraForPreTraining`, or `ConvBertModel` for ConvBERT, which transformers has no
pretraining head for: the one to fine-tune). The vocabulary is cut to the tokenizer's size (posjax pads the
embedding table to a multiple of 128 rows that no token uses).

Variants transformers cannot represent (TISA, ALiBi, RoPE, T5, composite attention, ...) stop with one line
naming what it can: BERT and ALBERT `absolute`, `relative_key`, `relative_key_query`; ELECTRA `absolute`;
ConvBERT `absolute+convbert` (convolution heads with head ratio 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

from absl import logging
from posjax.errors import ConfigError

MODEL_CARD = 'README.md'


def _exporter(kind: str):
  """(config_to_hf, export function) of a family."""
  from posjax.convert import hf_albert, hf_bert, hf_electra  # pylint: disable=g-import-not-at-top
  return {'bert': (hf_bert.config_to_hf, hf_bert.export_bert),
          'albert': (hf_albert.config_to_hf, hf_albert.export_albert),
          'electra': (hf_electra.config_to_hf, hf_electra.export_electra)}[kind]


def _cut_vocab(cfg, params, vocab: int):
  """cfg and params with the first `vocab` rows of the word embeddings and MLM bias (the rest are padding)."""
  if cfg.vocab_size == vocab:
    return cfg, params
  params = dict(params)
  params['embeddings'] = {**params['embeddings'],
                          'word_embeddings': params['embeddings']['word_embeddings'][:vocab]}
  if 'mlm_head' in params:
    params['mlm_head'] = {**params['mlm_head'], 'bias': params['mlm_head']['bias'][:vocab]}
  return dataclasses.replace(cfg, vocab_size=vocab), params


def family(run_config: dict, cfg) -> str:
  """'bert', 'albert' or 'electra' (ELECTRA and ConvBERT) for a pretraining run."""
  if run_config.get('objective') == 'electra':
    return 'electra'
  if run_config.get('model_type') == 'albert' or cfg.layer_groups or cfg.embedding_size:
    return 'albert'
  return 'bert'


def convbert_padding_note(cfg) -> str:
  """How transformers' ConvBERT differs from a posjax one trained with posjax's padding convention; '' when
  it does not (convbert_hf_padding=True) or the model has no convolution heads."""
  from posjax.attention import registry  # pylint: disable=g-import-not-at-top
  if not any(c.name == 'convbert' for c in registry.parse(cfg.attention).heads):
    return ''
  if cfg.option('convbert_hf_padding'):
    return ''
  k = cfg.option('convbert_kernel_size')
  return (f'this ConvBERT was trained with posjax\'s padding convention (convbert_hf_padding=False: hidden states '
          f'zeroed at padding before the two convolutions of its convolution heads); transformers\' ConvBERT '
          f'convolves the padded positions\' hidden states as they are. Unpadded rows (one sentence at a time, as '
          f'pipeline() runs by default) give posjax\'s outputs. In a padded row the last {k // 2} real tokens '
          f'(kernel {k} reaches {k // 2} positions to each side) read padding instead of zeros, so their '
          f'first-layer outputs differ, and from the second layer on every token of the row can differ through '
          f'attention to them; for posjax\'s outputs, give transformers rows of equal length, unpadded')


def _tokenizer_files(tok, workdir: str, directory: str, max_length: int) -> None:
  """The run's tokenizer as transformers reads it: tokenizer.json with BERT's special-token template,
  vocab.txt (WordPiece) or spiece.model (SentencePiece), tokenizer_config.json, special_tokens_map.json."""
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  from posjax.data import spm  # pylint: disable=g-import-not-at-top
  from posjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  ids = tokenizer_lib.special_ids(tok)
  names = {t: tok.id_to_token(i) for t, i in ids.items()}
  tok = tok.__class__.from_str(tok.to_str())  # a copy: the workdir's own stays as it is
  # Matched in text (a SentencePiece model's control symbols are not, until they are added tokens).
  tok.add_special_tokens(list(names.values()))
  cls, sep = names['[CLS]'], names['[SEP]']
  # posjax adds [CLS] and [SEP] itself when it makes examples; transformers expects the tokenizer to.
  tok.post_processor = processors.TemplateProcessing(
      single=f'{cls}:0 $A:0 {sep}:0', pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
      special_tokens=[(cls, ids['[CLS]']), (sep, ids['[SEP]'])])
  spec = json.loads(tok.to_str())
  special = {'unk_token': names['[UNK]'], 'sep_token': sep, 'pad_token': names['[PAD]'], 'cls_token': cls,
             'mask_token': names['[MASK]']}
  config = {**special, 'model_max_length': max_length, 'clean_up_tokenization_spaces': False}
  model_type = spec['model']['type']
  normalizer = spec.get('normalizer') or {}
  sentencepiece = os.path.join(workdir, spm.MODEL_FILE)
  if model_type == 'Unigram' and os.path.exists(sentencepiece):
    shutil.copyfile(sentencepiece, os.path.join(directory, spm.MODEL_FILE))
    # spm.from_model's normalizer is AlbertTokenizer's (lower case, accents stripped, spaces collapsed).
    config.update(tokenizer_class='AlbertTokenizer', do_lower_case=True, remove_space=True, keep_accents=False,
                  bos_token=cls, eos_token=sep)
  elif model_type == 'WordPiece' and normalizer.get('type') == 'BertNormalizer':
    config.update(tokenizer_class='BertTokenizer', do_lower_case=normalizer['lowercase'],
                  strip_accents=normalizer['strip_accents'],
                  tokenize_chinese_chars=normalizer['handle_chinese_chars'])
  else:  # any other tokenizer.json: transformers' generic fast tokenizer runs it as it is
    config['tokenizer_class'] = 'PreTrainedTokenizerFast'
  tok.save(os.path.join(directory, 'tokenizer.json'))
  if model_type == 'WordPiece':
    vocab = tok.get_vocab()
    with open(os.path.join(directory, 'vocab.txt'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])) + '\n')
  for name, content in (('tokenizer_config.json', config), ('special_tokens_map.json', special)):
    with open(os.path.join(directory, name), 'w') as f:
      json.dump(content, f, indent=2, sort_keys=True)


def _model_card(directory: str, source: str, architecture: str, attention: str, note: str) -> None:
  with open(os.path.join(directory, MODEL_CARD), 'w') as f:
    f.write(f'# {architecture}\n\nExported by posjax (`python -m posjax.convert.export`) from {source}; '
            f'posjax attention variant `{attention}`.\n')
    if note:
      f.write(f'\n**Padding.** {note[0].upper()}{note[1:]}.\n')


def export(run_dir: str, out_dir: str, step: int | None = None) -> dict[str, str]:
  """Writes the run's model(s) under `out_dir`; returns {part: directory} ('model', or 'generator' and
  'discriminator'). Everything is checked before anything is written; `out_dir` must be new or empty."""
  from posjax import pretrained  # pylint: disable=g-import-not-at-top
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ConfigError(f'output directory {out_dir!r} is not empty; give a new one (nothing is overwritten)')
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConfigError(f'output directory {out_dir!r} is a file')
  ck = pretrained.load(run_dir, step=step, what='RUN_DIR')
  if ck.kind != 'posjax':
    raise ConfigError(f'RUN_DIR {run_dir!r} is already a Hugging Face checkpoint (config.json)')
  if 'objective' not in ck.run_config:
    raise ConfigError(f'RUN_DIR {run_dir!r} is not a pretraining workdir (its config has no objective); '
                      'export takes what train.py --config=configs/{bert,albert,electra,convbert}.py wrote')
  vocab = ck.tokenizer.get_vocab_size()
  kind = family(ck.run_config, ck.config)
  if kind == 'electra':
    parts = {'generator': ck.mlm, 'discriminator': (ck.config, ck.params)}
    dirs = {name: os.path.join(out_dir, name) for name in parts}
  else:
    parts = {'model': ck.mlm}
    dirs = {'model': out_dir}
  to_hf, write = _exporter(kind)
  plans = {}
  for name, (cfg, params) in parts.items():
    cfg, params = _cut_vocab(cfg, params, vocab)
    try:
      plans[name] = (cfg, params, to_hf(cfg))
    except ConfigError as e:
      raise ConfigError(f'{ck.source} cannot be exported to transformers: {e}') from None
  note = convbert_padding_note(ck.config)
  if note:
    logging.warning('%s', note)
  for name, (cfg, params, hfc) in plans.items():
    os.makedirs(dirs[name], exist_ok=True)
    write(cfg, params, dirs[name])
    _tokenizer_files(ck.tokenizer, run_dir, dirs[name], hfc['max_position_embeddings'])
    _model_card(dirs[name], ck.source, hfc['architectures'][0], cfg.attention, note)
  return dirs


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m posjax.convert.export',
                               description='Writes a posjax pretraining workdir as Hugging Face directories that '
                                           'AutoTokenizer, AutoModelForMaskedLM and pipeline("fill-mask") load '
                                           'as they are.',
                               epilog='BERT and ALBERT runs are written to OUT_DIR; ELECTRA and ConvBERT runs give '
                                      'OUT_DIR/generator (for fill-mask) and OUT_DIR/discriminator (for '
                                      'fine-tuning).')
  ap.add_argument('run_dir', metavar='RUN_DIR',
                  help='The posjax pretraining workdir to export (what train.py wrote to --workdir).')
  ap.add_argument('out_dir', metavar='OUT_DIR', help='A new or empty directory for the Hugging Face files.')
  ap.add_argument('--step', type=int, default=None, help='The checkpoint step to export; the latest by default.')
  args = ap.parse_args(argv)
  try:
    dirs = export(args.run_dir, args.out_dir, args.step)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for name, directory in dirs.items():
    use = {'model': 'AutoModelForMaskedLM / pipeline("fill-mask")', 'generator': 'fill-mask',
           'discriminator': 'fine-tuning'}[name]
    print(f'{name}: {directory} ({use})')
  return 0


if __name__ == '__main__':
  from posjax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_tpu_probe()
  sys.exit(main())
