"""SentencePiece vocabularies for ALBERT: train a unigram model with `sentencepiece`, or load a `.model` file.

Either way the model becomes an HF `tokenizers.Tokenizer` that encodes as HF's (slow, reference)
`AlbertTokenizer` does on the same `.model` (lower-cased, accents stripped, `` and '' as ", whitespace runs
as one space), so the rest of the pipeline (batched `encode_batch`, specials, saving `tokenizer.json`) is the
one WordPiece uses. ALBERT's ids: <pad> 0, <unk> 1, [CLS] 2, [SEP] 3, [MASK] 4.
"""

from __future__ import annotations

import io
import os
import shutil
import unicodedata

import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from posjax.errors import ConfigError

MODEL_FILE = 'spiece.model'  # ALBERT's name for it, kept beside tokenizer.json in the workdir


def albert_preprocess(text: str) -> str:
  """What AlbertTokenizer does to a text before SentencePiece sees it (do_lower_case, no keep_accents)."""
  text = ' '.join(text.strip().split()).replace('``', '"').replace("''", '"')
  text = ''.join(c for c in unicodedata.normalize('NFKD', text) if not unicodedata.combining(c))
  return text.lower()


def train_unigram(documents, vocab_size: int, directory: str) -> Tokenizer:
  """A unigram SentencePiece model of `documents` (as ALBERT's: specials at ids 0-4), written to
  `directory/spiece.model`, as a Tokenizer."""
  model = io.BytesIO()
  fed = 0

  def sentences():
    nonlocal fed
    for d in documents:
      fed += 1
      yield albert_preprocess(d)

  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
        model_type='unigram', pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece='<pad>', unk_piece='<unk>',
        control_symbols=['[CLS]', '[SEP]', '[MASK]'], input_sentence_size=1_000_000, shuffle_input_sentence=True,
        max_sentence_length=1 << 16, minloglevel=2, num_threads=2, hard_vocab_limit=False,
        # Digits as pieces of their own: AlbertTokenizer re-splits pieces like "9," (see from_model), so a
        # model without them encodes identically in every implementation.
        split_digits=True)
  except RuntimeError as e:
    if not fed:
      raise ConfigError('data: no usable text to train a SentencePiece vocabulary on (the training documents '
                        'are empty or were all skipped)') from None
    raise ConfigError(f'data.vocab_size: SentencePiece training failed ({e})') from None
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, MODEL_FILE)
  with open(path, 'wb') as f:
    f.write(model.getvalue())
  return from_model(path)


def _keeps_number_comma(piece: str) -> bool:
  return len(piece) < 2 or piece[-1] != ',' or not piece[-2].isdigit()


def from_model(path: str, copy_to: str | None = None) -> Tokenizer:
  """A SentencePiece `.model` file as a Tokenizer (optionally copied to `copy_to/spiece.model`)."""
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    with open(path, 'rb') as f:
      proto.ParseFromString(f.read())
  except (OSError, Exception) as e:  # protobuf's DecodeError is not an OSError
    raise ConfigError(f'data.tokenizer: {path!r} is not a SentencePiece model ({type(e).__name__})') from None
  if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
    raise ConfigError(f'data.tokenizer: {path!r} is not a unigram SentencePiece model (ALBERT uses unigram)')
  if copy_to and os.path.abspath(path) != os.path.abspath(os.path.join(copy_to, MODEL_FILE)):
    os.makedirs(copy_to, exist_ok=True)
    shutil.copyfile(path, os.path.join(copy_to, MODEL_FILE))
  # AlbertTokenizer re-splits a piece like "9," after encoding; never choosing such pieces is HF's fast
  # tokenizer's approximation of that (exact for our models, which have none).
  vocab = [(p.piece, p.score if _keeps_number_comma(p.piece) else p.score - 100) for p in proto.pieces]
  tok = Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
  steps = [normalizers.Strip(), normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Replace('``', '"'),
           normalizers.Replace("''", '"'), normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()]
  if proto.normalizer_spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
  steps.append(normalizers.Replace(Regex(' {2,}'), ' '))
  tok.normalizer = normalizers.Sequence(steps)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='always')
  tok.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='always')
  return tok
