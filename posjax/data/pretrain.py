"""MLM examples: token ids -> fixed-length sequences (single or sentence pairs) -> BERT masking.

posjax/data/pipeline.py runs these inside the grain pipeline.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Specials:
  pad: int
  cls: int
  sep: int
  mask: int
  unk: int

  @classmethod
  def from_tokenizer_ids(cls, ids: dict[str, int]) -> 'Specials':
    return cls(pad=ids['[PAD]'], cls=ids['[CLS]'], sep=ids['[SEP]'], mask=ids['[MASK]'], unk=ids['[UNK]'])


MIN_CHUNK = 8  # tokens: a document's last piece shorter than this makes no example of its own


def chunk(ids, body: int) -> list[np.ndarray]:
  """A document's token ids cut into consecutive pieces of `body` tokens; the last is kept if it has at least
  MIN_CHUNK tokens. Pieces never cross documents."""
  ids = np.asarray(ids, np.int32)
  return [ids[s:s + body] for s in range(0, len(ids), body) if min(body, len(ids) - s) >= MIN_CHUNK]


def check_length(seq_len: int, task: str | None) -> None:
  if task not in (None, 'nsp', 'sop'):
    raise ValueError(f'task must be None, nsp or sop; got {task!r}')
  least = 11 if task else 8
  if seq_len < least:
    raise ConfigError(f'data.seq_len must be at least {least}{" for sentence pairs" if task else ""}; '
                      f'got {seq_len}')


def body_length(seq_len: int, task: str | None) -> int:
  """Tokens of a document per example: all but [CLS] [SEP] (and a second [SEP] for sentence pairs)."""
  check_length(seq_len, task)
  return seq_len - (3 if task else 2)


def single(piece: np.ndarray, seq_len: int, specials: Specials) -> np.ndarray:
  """`[CLS] piece [SEP] [PAD]...` (L,) int32."""
  row = np.full(seq_len, specials.pad, np.int32)
  row[0] = specials.cls
  row[1:1 + len(piece)] = piece
  row[1 + len(piece)] = specials.sep
  return row


def pack(token_lists, seq_len: int, specials: Specials) -> np.ndarray:
  """Every document's pieces (`chunk`) as `[CLS] piece [SEP] [PAD]...` rows: int32 NxL."""
  body = body_length(seq_len, None)
  rows = [single(c, seq_len, specials) for ids in token_lists for c in chunk(ids, body)]
  return np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)


def pair(piece: np.ndarray, rng: np.random.Generator, task: str, seq_len: int, specials: Specials,
         other=None) -> dict[str, np.ndarray]:
  """A sentence-pair example `[CLS] A [SEP] B [SEP]` of one piece, for next-sentence or sentence-order
  prediction; the draws come from `rng`, so a fresh one (every epoch) gives a fresh pair.

  The piece (at least 2 tokens) is split at a random point into consecutive segments A and B. `task='sop'`
  (ALBERT): with probability 1/2 the two are swapped, label 1 (0: in order). `task='nsp'` (BERT): with
  probability 1/2 B is replaced by an equally long span (or all, if shorter) of a piece of another document,
  `other(rng)`, label 1 (0: B follows A); when `other` finds none (None), the pair stays in order, label 0.
  Segments are split at token, not sentence, boundaries. Returns `ids` and `type_ids` (0 for [CLS] A [SEP],
  1 for B [SEP]), (L,) int32, and `sentence_labels` ().
  """
  cut = int(rng.integers(1, len(piece)))
  a, b = piece[:cut], piece[cut:]
  label = int(rng.random() < 0.5)
  if label and task == 'sop':
    a, b = b, a
  elif label and task == 'nsp':
    foreign = other(rng) if other is not None else None
    if foreign is None or not len(foreign):
      label = 0
    else:
      at = int(rng.integers(0, max(1, len(foreign) - len(b) + 1)))
      b = foreign[at:at + len(b)]
  seq = np.concatenate([[specials.cls], a, [specials.sep], b, [specials.sep]]).astype(np.int32)
  ids = np.full(seq_len, specials.pad, np.int32)
  ids[:len(seq)] = seq
  types = np.zeros(seq_len, np.int32)
  types[len(a) + 2:len(seq)] = 1
  return {'ids': ids, 'type_ids': types, 'sentence_labels': np.int32(label)}


def mask_tokens(ids_BxL: np.ndarray, rng: np.random.Generator, specials: Specials, vocab_size: int,
                mask_prob: float = 0.15, max_predictions: int | None = None, continuation=None):
  """BERT's masking (create_pretraining_data.py): in each sequence choose round(mask_prob * n) of its n real
  tokens (at least 1, at most `max_predictions`); of those 80% -> [MASK], 10% -> a random token, 10% kept.

  Returns a dict: `ids` (the corrupted inputs, BxL), `mask` (True at real tokens), `positions`, `labels`
  (original ids) and `weights` (1.0 for real predictions, 0.0 for padding slots), each BxP with
  P = max_predictions, so the MLM head only runs on the chosen positions.

  Whole-word masking: `continuation` (a bool per vocabulary id, True for tokens that continue a word, as
  WordPiece's `##x`) makes the choice one of whole words, in random order, each taken only if all its tokens
  fit in the count (BERT's create_pretraining_data.py with do_whole_word_mask).
  """
  b, l = ids_BxL.shape
  p = max_predictions or max(1, int(np.ceil(l * mask_prob)))
  candidate = ~np.isin(ids_BxL, [specials.pad, specials.cls, specials.sep])
  count_B = np.minimum(np.maximum(1, np.rint(candidate.sum(1) * mask_prob)), p).astype(np.int64)
  count_B = np.minimum(count_B, candidate.sum(1))
  if continuation is None:
    # A random order of each row's candidates; the first count_B of it are chosen.
    order = np.argsort(np.where(candidate, rng.random((b, l)), np.inf), axis=1, kind='stable')[:, :p]
  else:
    order, count_B = _whole_words(candidate, np.asarray(continuation)[ids_BxL], count_B, p, rng)
  if order.shape[1] < p:  # sequences shorter than max_predictions
    order = np.pad(order, ((0, 0), (0, p - order.shape[1])))
  valid_BxP = np.arange(p)[None, :] < count_B[:, None]
  positions_BxP = np.where(valid_BxP, order, 0).astype(np.int32)
  rows = np.arange(b)[:, None]
  labels_BxP = np.where(valid_BxP, ids_BxL[rows, positions_BxP], 0).astype(np.int32)
  action = rng.random((b, p))
  random_ids = rng.integers(0, vocab_size, size=(b, p), dtype=np.int32)
  new = np.where(action < 0.8, specials.mask, np.where(action < 0.9, random_ids, labels_BxP))
  inputs = ids_BxL.copy()
  r, c = np.nonzero(valid_BxP)
  inputs[r, positions_BxP[r, c]] = new[r, c]
  return {'ids': inputs, 'mask': ids_BxL != specials.pad, 'positions': positions_BxP,
          'labels': labels_BxP, 'weights': valid_BxP.astype(np.float32)}


def _whole_words(candidate_BxL, continues_BxL, count_B, p, rng):
  """Positions of whole words drawn in random order per row, and how many were taken (<= count_B)."""
  b, l = candidate_BxL.shape
  order = np.zeros((b, p), np.int64)
  taken = np.zeros(b, np.int64)
  for r in range(b):
    pos = np.nonzero(candidate_BxL[r])[0]
    if not len(pos):
      continue
    # A continuation token belongs to the word before it (a lone one starts its own).
    starts = ~continues_BxL[r, pos] | (np.diff(pos, prepend=-2) != 1)
    words = np.split(pos, np.nonzero(starts)[0][1:])
    for w in rng.permutation(len(words)):
      if taken[r] + len(words[w]) <= count_B[r]:
        order[r, taken[r]:taken[r] + len(words[w])] = words[w]
        taken[r] += len(words[w])
  return order, taken
