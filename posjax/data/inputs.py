"""The one data seam of pretraining, as flax lm1b's `input_pipeline.get_datasets(config)`: a config and a
workdir in; the tokenizer, the training batches, the eval batches and the corpus statistics out.

Documents (a prepared tfds dataset, read record by record: posjax/data/sources.py) -> tokenizer (the
workdir's, the configured one, or newly trained) -> pieces on disk (posjax/data/pieces.py; on several hosts
each process tokenises its share) -> grain pipelines (posjax/data/pipeline.py). Every data error surfaces
here, before anything is compiled.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from posjax.data import corpus as corpus_lib
from posjax.data import pieces
from posjax.data import pipeline
from posjax.data import pretrain
from posjax.data import sources
from posjax.data import spm
from posjax.data import tokenizer as tokenizer_lib
from posjax.errors import ConfigError
from posjax.training import distributed

TOKENIZER_KINDS = ('wordpiece', 'sentencepiece')
# Objectives whose examples are sentence pairs, and the pair task they use.
PAIR_TASKS = {'mlm+nsp': 'nsp', 'mlm+sop': 'sop'}


@dataclasses.dataclass(frozen=True)
class Datasets:
  tokenizer: Any  # an HF `tokenizers.Tokenizer`
  train: Any  # grain MapDataset: element s is this process's rows of global batch s
  eval: pipeline.MLMBatches
  stats: dict  # documents, tokens, examples and skipped records (pieces.summary formats them)
  vocab_size: int
  specials: pretrain.Specials
  max_predictions: int


def train_tokenizer(config, workdir: str, documents):
  """A vocabulary of data.vocab_size tokens: WordPiece, or (ALBERT) a unigram SentencePiece model saved as
  WORKDIR/spiece.model."""
  logging.info('training a %s vocabulary of %d tokens', config.data.tokenizer_kind, config.data.vocab_size)
  if config.data.tokenizer_kind == 'sentencepiece':
    return spm.train_unigram(documents, config.data.vocab_size, workdir)
  return tokenizer_lib.train_wordpiece(documents, config.data.vocab_size)


def tokenizer_for(config, workdir: str, documents):
  """The workdir's tokenizer if it has one (resume), else the configured one, else a newly trained one."""
  saved = os.path.join(workdir, 'tokenizer.json')
  if os.path.exists(saved):
    return tokenizer_lib.load(saved)
  if config.data.tokenizer.endswith('.model'):
    tok = spm.from_model(config.data.tokenizer, copy_to=workdir if jax.process_index() == 0 else None)
  elif config.data.tokenizer:
    tok = tokenizer_lib.load(config.data.tokenizer)
  elif jax.process_count() > 1:
    # Process 0 trains and the others read its file from the (shared) workdir: one vocabulary on record, which
    # every host (and every resume) tokenises with.
    distributed.everyone(lambda: jax.process_index() == 0 and tokenizer_lib.save(
        train_tokenizer(config, workdir, documents), workdir), 'training the tokenizer')
    if not os.path.exists(saved):
      raise ConfigError(f'{saved} (written by process 0) is not visible to process {jax.process_index()}: a '
                        'multi-host run needs a shared workdir, or set data.tokenizer')
    return tokenizer_lib.load(saved)
  else:
    tok = train_tokenizer(config, workdir, documents)
  if jax.process_index() == 0:
    tokenizer_lib.save(tok, workdir)
  return tok


def prepare_pieces(config, workdir: str, documents, held_out, tok, body: int):
  """The directory of the corpus's pieces (posjax/data/pieces.py) and their statistics; on several hosts each
  process tokenises its share of the corpus and process 0 joins the parts."""
  data_dir = config.data.data_dir or sources.default_data_dir(workdir)
  directory = pieces.cache_dir(data_dir, documents, config.data.seed, config.data.eval_fraction, tok, body)
  if jax.process_count() == 1:
    return directory, pieces.prepare(documents, held_out, tok, body, directory)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  index, count = jax.process_index(), jax.process_count()
  # Every process follows process 0's view of the cache, so that all of them reach the same collectives.
  if not multihost_utils.broadcast_one_to_all(np.int32(pieces.exists(directory))):
    distributed.everyone(lambda: pieces.write_part(documents, held_out, tok, body, directory, index, count),
                         'tokenising its share of the corpus')
    distributed.everyone(lambda: index == 0 and pieces.join(directory, count), 'joining the tokenised parts')
  else:
    multihost_utils.sync_global_devices('posjax pieces found')
  if not pieces.exists(directory):
    raise ConfigError(f'data.data_dir: {data_dir} (written by process 0) is not visible to process {index}: a '
                      'multi-host run needs a shared data dir')
  return directory, pieces.read_meta(directory)


def get_datasets(config, workdir: str) -> Datasets:
  """Documents (a prepared tfds dataset, read record by record) -> tokenizer -> pieces on disk -> the grain
  pipeline; logs the statistics: documents, tokens, examples per epoch, what was skipped and why."""
  documents = sources.open_documents(config.data, workdir)
  held_out = sources.held_out(len(documents), config.data.seed, config.data.eval_fraction)
  limit = config.data.tokenizer_documents or len(documents)
  tok = tokenizer_for(config, workdir, documents.iter_texts(np.flatnonzero(~held_out)[:limit],
                                                            collections.Counter()))
  specials = pretrain.Specials.from_tokenizer_ids(tokenizer_lib.special_ids(tok))
  vocab = tok.get_vocab_size()
  task = PAIR_TASKS.get(config.objective)
  seq_len = config.data.seq_len
  body = pretrain.body_length(seq_len, task)
  directory, stats = prepare_pieces(config, workdir, documents, held_out, tok, body)
  logging.info('%s: %s%s; vocabulary %d', documents.what, pieces.summary(stats, seq_len),
               f'; {task} pairs' if task else '', vocab)
  if not sum(stats['documents'].values()):
    raise ConfigError(f'data.source={config.data.source}: no usable text in {documents.what} (skipped: '
                      f'{corpus_lib.why(stats["skipped"])})')
  train_x = pipeline.PieceExamples(pieces.Pieces(directory, 'train', vocab), seq_len, specials, task)
  eval_x = pipeline.PieceExamples(pieces.Pieces(directory, 'eval', vocab), seq_len, specials, task)
  eval_fields = eval_x.materialise(config.eval_batches * config.batch_size, config.data.seed + 1)
  if len(eval_fields['ids']) == 0:
    eval_fields = train_x.materialise(config.batch_size, config.data.seed + 1)
    logging.warning('held-out documents gave no sequence; evaluating on %d training sequences',
                    len(eval_fields['ids']))
  continuation = pipeline.word_continuations(tok) if config.data.whole_word_masking else None
  masking = pipeline.Masking(specials, vocab, config.data.mask_prob, config.data.max_predictions, continuation)
  train = pipeline.train_dataset(train_x, config.batch_size, config.data.seed, masking)
  eval_data = pipeline.MLMBatches(eval_fields, config.batch_size, specials, vocab, config.data.seed,
                                  config.data.mask_prob, config.data.max_predictions or None, continuation)
  return Datasets(tok, train, eval_data, stats, vocab, specials, eval_data.max_predictions)


