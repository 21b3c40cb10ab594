"""WordPiece vocabularies with Hugging Face `tokenizers`: train one from a corpus, or load an HF one."""

from __future__ import annotations

import collections
import os

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from posjax.errors import ConfigError

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
_PRIVATE = 0xF0000  # the first supplementary private-use code point


def _bert_pipeline(tok: Tokenizer, lowercase: bool = True) -> Tokenizer:
  tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  return tok


def train_wordpiece(documents, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
  """A lowercased BERT-style WordPiece vocabulary; special tokens take ids 0-4 in SPECIAL_TOKENS order.

  The same documents give the same vocabulary in every process. HF's WordPieceTrainer does not: it numbers the
  `##c` pieces in its hash map's (per-process random) order, and those numbers break ties between equally
  frequent merges (huggingface/tokenizers#1794). So the pieces are spelt so that their numbers are sorted
  character codes: each non-initial character becomes a private-use character (in sorted order), the BPE trainer
  (WordPiece's own trainer minus the `##`) learns the merges, and the vocabulary is spelt back with `##`.
  Words holding characters of the supplementary private-use planes (U+F0000 on) are left out of training.
  """
  tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token='[UNK]')))
  counts = collections.Counter()
  for doc in documents:
    counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(doc)))
  words = sorted(w for w in counts if all(ord(c) < _PRIVATE for c in w))
  tail = sorted({c for w in words for c in w[1:]})
  spell = {c: chr(_PRIVATE + i) for i, c in enumerate(tail)}
  unspell = {p: c for c, p in spell.items()}

  def spelt_words():  # the trainer counts whitespace-separated words; each word once per occurrence
    for w in words:
      yield (w[0] + ''.join(spell[c] for c in w[1:]) + ' ') * counts[w]

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  bpe.train_from_iterator(spelt_words(), trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
      show_progress=False), length=len(words))
  vocab = {}
  for piece, i in bpe.get_vocab().items():
    if piece in SPECIAL_TOKENS:
      vocab[piece] = i
    elif piece[0] in unspell:
      vocab['##' + ''.join(unspell[c] for c in piece)] = i
    else:
      vocab[piece[0] + ''.join(unspell[c] for c in piece[1:])] = i
  tok.model = models.WordPiece(vocab, unk_token='[UNK]')
  tok.add_special_tokens(list(SPECIAL_TOKENS))
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
