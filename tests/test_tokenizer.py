"""WordPiece training: the same documents give the same vocabulary in every process."""

import os
import subprocess
import sys

from helpers import ROOT
from posjax.data import tokenizer

TRAIN = ('import sys; from posjax.data import corpus, tokenizer; '
         'sys.stdout.write(tokenizer.train_wordpiece(corpus.default_corpus().documents, 1000).to_str())')


def test_vocabulary_is_the_same_in_every_process():
  """HF's WordPieceTrainer gives a different vocabulary per process on this corpus (ties among equal counts)."""
  outs = []
  for seed in ('1', '2'):
    env = {**os.environ, 'PYTHONHASHSEED': seed, 'PYTHONPATH': ROOT}
    outs.append(subprocess.run([sys.executable, '-c', TRAIN], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=120, check=True).stdout)
  assert outs[0] and outs[0] == outs[1]


def test_vocabulary_spells_wordpieces():
  docs = ['the cat sat on the mat with another cat', 'a hat for the cat and the rat'] * 20
  tok = tokenizer.train_wordpiece(docs, 60)
  vocab = tok.get_vocab()
  assert [vocab[t] for t in tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  assert sorted(vocab.values()) == list(range(len(vocab)))
  assert all('\U000f0000' > c for t in vocab for c in t), 'a private-use spelling leaked into the vocabulary'
  assert {'cat', 'the', '##a', '##t'} <= set(vocab)
  assert tok.encode('the cat [MASK]').tokens == ['the', 'cat', '[MASK]']


def test_private_use_words_are_left_out_not_fatal():
  docs = ['plain words here and there \U000f0001x', 'plain words again'] * 5
  tok = tokenizer.train_wordpiece(docs, 40)
  assert 'plain' in tok.get_vocab()
