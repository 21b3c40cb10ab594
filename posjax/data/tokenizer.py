"""WordPiece vocabularies with Hugging Face `tokenizers`: train one from a corpus, or load an HF one."""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from posjax.errors import ConfigError

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def _bert_pipeline(tok: Tokenizer, lowercase: bool = True) -> Tokenizer:
  tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  return tok


def train_wordpiece(documents, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
  """A lowercased BERT-style WordPiece vocabulary; special tokens take ids 0-4 in SPECIAL_TOKENS order."""
  tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token='[UNK]')))
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  tok.train_from_iterator(documents, trainer, length=len(documents))
  return tok


def load(path: str) -> Tokenizer:
  """`tokenizer.json` (any HF tokenizer) or a BERT `vocab.txt`, or a directory holding either."""
  if os.path.isdir(path):
    for name in ('tokenizer.json', 'vocab.txt'):
      if os.path.exists(os.path.join(path, name)):
        return load(os.path.join(path, name))
    raise ConfigError(f'data.tokenizer: {path!r} holds neither tokenizer.json nor vocab.txt')
  if not os.path.exists(path):
    raise ConfigError(f'data.tokenizer: {path!r} does not exist')
  if path.endswith('.txt'):
    return _bert_pipeline(Tokenizer(models.WordPiece.from_file(path, unk_token='[UNK]')))
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
    raise ConfigError(f'data.tokenizer: {path!r} is not a tokenizer.json file ({e})') from None


def save(tok: Tokenizer, directory: str) -> None:
  """tokenizer.json plus BERT's vocab.txt (one token per line in id order), so HF tools can read it."""
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  vocab = tok.get_vocab()
  with open(os.path.join(directory, 'vocab.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])) + '\n')


# SentencePiece vocabularies (ALBERT's) spell two of them differently.
ALIASES = {'[PAD]': '<pad>', '[UNK]': '<unk>'}


def special_ids(tok: Tokenizer) -> dict[str, int]:
  ids = {}
  for t in SPECIAL_TOKENS:
    i = tok.token_to_id(t)
    if i is None and t in ALIASES:
      i = tok.token_to_id(ALIASES[t])
    if i is None:
      raise ConfigError(f'tokenizer has no {t} token; BERT pretraining needs all of {", ".join(SPECIAL_TOKENS)}')
    ids[t] = i
  return ids
