"""SentencePiece for ALBERT: trained or loaded models encode as HF's AlbertTokenizer on the same file."""

import gzip
import itertools
import json
import os

import pytest

from helpers import micro_config
from posjax.data import corpus, inputs, spm, tokenizer
from posjax.errors import ConfigError
from posjax.training import pretraining

EDGE_CASES = ["Héllo  ``World''  It's 1,000,000 9, 10,5 café\tnaïve\n\n  x", '  leading and trailing  ',
              'ÀÉÎÕÜ ﬁ ① ＦＵＬＬＷＩＤＴＨ', 'tabs\tand\nnewlines\r\nhere', '']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('spm'))
  return spm.train_unigram(corpus.default_corpus().documents[:300], 1500, directory), directory


def test_trained_model_has_albert_specials_and_matches_albert_tokenizer(trained):
  transformers = pytest.importorskip('transformers')
  tok, directory = trained
  path = os.path.join(directory, spm.MODEL_FILE)
  assert [tok.id_to_token(i) for i in range(5)] == ['<pad>', '<unk>', '[CLS]', '[SEP]', '[MASK]']
  assert tokenizer.special_ids(tok) == {'[PAD]': 0, '[UNK]': 1, '[CLS]': 2, '[SEP]': 3, '[MASK]': 4}
  hf = transformers.AlbertTokenizer(path)
  texts = corpus.default_corpus().documents[300:500] + EDGE_CASES
  loaded = spm.from_model(path)
  for text in texts:
    expected = hf(text, add_special_tokens=False)['input_ids']
    assert tok.encode(text, add_special_tokens=False).ids == expected, text[:200]
    assert loaded.encode(text, add_special_tokens=False).ids == expected, text[:200]


def test_matches_albert_tokenizer_on_imdb_reviews(trained, shared_data):
  transformers = pytest.importorskip('transformers')
  tok, directory = trained
  hf = transformers.AlbertTokenizer(os.path.join(directory, spm.MODEL_FILE))
  with gzip.open(os.path.join(shared_data, 'imdb', 'imdb_unsup.jsonl.gz'), 'rt') as f:
    texts = [json.loads(l)['text'] for l in itertools.islice(f, 150)]
  got = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
  assert got == [hf(t, add_special_tokens=False)['input_ids'] for t in texts]


def test_not_a_model_file_is_a_config_error(tmp_path):
  (tmp_path / 'x.model').write_bytes(b'\x00garbage\xff' * 10)
  with pytest.raises(ConfigError, match='data.tokenizer: .*x.model'):
    spm.from_model(str(tmp_path / 'x.model'))


def test_training_on_no_text_says_so(tmp_path):
  with pytest.raises(ConfigError, match='no usable text to train a SentencePiece vocabulary'):
    spm.train_unigram(iter([]), 100, str(tmp_path))


def test_albert_config_trains_a_sentencepiece_vocabulary(tmp_path, trained):
  from helpers import load_config_module
  assert load_config_module('albert').get_config('tiny').data.tokenizer_kind == 'sentencepiece'
  c = micro_config(num_train_steps=6, eval_every=6, checkpoint_every=6, log_every=3, objective='mlm+sop',
                   **{'data.tokenizer_kind': 'sentencepiece'})
  last = pretraining.train_and_evaluate(c, str(tmp_path / 'run'))
  assert last['loss'] > 0 and (tmp_path / 'run' / spm.MODEL_FILE).exists()
  assert tokenizer.load(str(tmp_path / 'run' / 'tokenizer.json')).id_to_token(0) == '<pad>'
  # A given .model file is used as it is, and kept in the workdir.
  _, directory = trained
  c.data.tokenizer = os.path.join(directory, spm.MODEL_FILE)
  tok = inputs.tokenizer_for(c, str(tmp_path / 'other'), [])
  assert tok.get_vocab_size() == 1500 and (tmp_path / 'other' / spm.MODEL_FILE).exists()
  with pytest.raises(ConfigError, match='data.tokenizer_kind .* wordpiece, sentencepiece'):
    pretraining.validate(micro_config(**{'data.tokenizer_kind': 'bpe'}))
