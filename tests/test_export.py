"""`python -m posjax.convert.export RUN_DIR OUT_DIR`: a pretraining workdir becomes Hugging Face directories that
AutoTokenizer, AutoModelForMaskedLM and pipeline('fill-mask') load as they are, predicting posjax's top-k;
variants transformers cannot represent stop with one line; a ConvBERT's padding difference is stated and holds.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config_module, micro_config
from posjax import configs, pretrained
from posjax.convert import export
from posjax.data import spm
from posjax.data import tokenizer as tokenizer_lib
from posjax.models import Bert
from posjax.training import checkpoint, objectives, pretraining, steps

os.environ['HF_HUB_OFFLINE'] = '1'
transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')

WORDS = ('the a function returns value list of values module class method string file name object type '
         'error number argument default and or is was not in on for with by as to it this that').split()
TEXT = 'the function returns a [MASK] of the values.'


def documents(n=300, seed=0):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, 40)) + '.' for _ in range(n)]


def saved_run(path, name, arg, sentencepiece=False, **overrides):
  """A workdir as the trainer leaves it (tokenizer, a checkpoint with its meta); every parameter of the
  objective's tree is drawn N(0, 0.3^2) with NumPy (no compilation), wide enough that the MLM logits' top-k
  are well separated."""
  c = load_config_module(name).get_config(arg)
  c.model.update(hidden_size=32, num_heads=4, intermediate_size=64, num_layers=2,
                 hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=64)
  c.data.seq_len = 32
  for k, v in overrides.items():
    configs.override(c, k, v)
  work = str(path)
  if sentencepiece:
    tok = spm.train_unigram(documents(), 120, work)
  else:
    tok = tokenizer_lib.train_wordpiece(documents(), 120)
  tokenizer_lib.save(tok, work)
  mcfg = pretraining.model_config(c, tok.get_vocab_size())
  objective = objectives.make(c, mcfg, c.data.seq_len, 5)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.3, x.shape).astype(x.dtype),
                                  jax.eval_shape(lambda: nn.unbox(steps.init_params(objective, 0))))
  state = steps.TrainState(step=jnp.array(3), params=params, opt_state=jnp.zeros(()),
                           rng=jax.random.PRNGKey(0), skipped=jnp.array(0), first_bad_step=jnp.array(-1))
  meta = {'model': {**{k: v for k, v in mcfg.to_dict().items() if k not in ('dtype', 'remat_policy')},
                    'objective': c.objective},
          'config': json.loads(c.to_json_best_effort())}
  mngr = checkpoint.manager(work, 1)
  checkpoint.save(mngr, 3, state, meta)
  mngr.wait_until_finished()
  mngr.close()
  return work


def posjax_top_k(cfg, params, tok, text, k=5):
  """The token ids and probabilities posjax's MLM head ranks first at the [MASK] of `[CLS] text [SEP]`,
  over the tokenizer's vocabulary (the export drops the embedding table's padding rows)."""
  ids = tokenizer_lib.special_ids(tok)
  left, right = (tok.encode(t, add_special_tokens=False).ids for t in text.split('[MASK]'))
  row = [ids['[CLS]']] + left + [ids['[MASK]']] + right + [ids['[SEP]']]
  logits = np.asarray(jax.jit(Bert(cfg).apply)({'params': params}, jnp.asarray([row]))['mlm_logits_BxLxV'])[0]
  at = logits[row.index(ids['[MASK]']), :tok.get_vocab_size()].astype(np.float64)
  p = np.exp(at - at.max())
  p /= p.sum()
  top = np.argsort(-p)[:k]
  return row, top.tolist(), p[top]


def check_fill_mask(directory, cfg, params, tok, text=TEXT):
  row, top, probs = posjax_top_k(cfg, params, tok, text)
  fast = transformers.AutoTokenizer.from_pretrained(directory)
  assert fast.is_fast and fast(text)['input_ids'] == row
  slow = transformers.AutoTokenizer.from_pretrained(directory, use_fast=False)
  assert slow(text)['input_ids'] == row
  model = transformers.AutoModelForMaskedLM.from_pretrained(directory)
  assert model.config.vocab_size == tok.get_vocab_size()
  fill = transformers.pipeline('fill-mask', model=directory, top_k=5)
  got = fill(text)
  assert [g['token'] for g in got] == top
  np.testing.assert_allclose([g['score'] for g in got], probs, rtol=1e-4)
  return model


def test_bert(tmp_path, capsys):
  run, out = saved_run(tmp_path / 'run', 'bert', 'tiny'), tmp_path / 'hf'
  assert export.main([run, str(out)]) == 0
  assert f'model: {out}' in capsys.readouterr().out
  for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'vocab.txt', 'tokenizer_config.json',
               'special_tokens_map.json'):
    assert (out / name).exists(), name
  ck = pretrained.load(run)
  assert ck.mlm[0].vocab_size == 128 and ck.tokenizer.get_vocab_size() < 128  # padded rows are dropped
  check_fill_mask(str(out), *ck.mlm, ck.tokenizer)
  # Nothing is overwritten.
  assert export.main([run, str(out)]) == 2
  assert 'error: output directory' in capsys.readouterr().err


@pytest.mark.slow  # ~30 s: trains first
def test_trained_bert_run(tmp_path):
  run, out = tmp_path / 'run', tmp_path / 'hf'
  pretraining.train_and_evaluate(micro_config(num_train_steps=20, eval_every=20, checkpoint_every=20),
                                 str(run))
  assert export.main([str(run), str(out)]) == 0
  ck = pretrained.load(str(run))
  check_fill_mask(str(out), *ck.mlm, ck.tokenizer)


def test_albert_sentencepiece(tmp_path):
  run = saved_run(tmp_path / 'run', 'albert', 'tiny', sentencepiece=True, **{'model.embedding_size': 16})
  dirs = export.export(run, str(tmp_path / 'hf'))
  assert os.path.exists(os.path.join(dirs['model'], 'spiece.model'))
  assert not os.path.exists(os.path.join(dirs['model'], 'vocab.txt'))
  ck = pretrained.load(run)
  assert type(check_fill_mask(dirs['model'], *ck.mlm, ck.tokenizer)).__name__ == 'AlbertForMaskedLM'


@pytest.mark.slow  # the default suite exports ConvBERT, the same layout
def test_electra_generator_and_discriminator(tmp_path):
  run = saved_run(tmp_path / 'run', 'electra', 'tiny', **{'electra.generator_fraction': 0.5,
                                                            'model.embedding_size': 16})
  dirs = export.export(run, str(tmp_path / 'hf'))
  assert dirs == {'generator': str(tmp_path / 'hf' / 'generator'),
                  'discriminator': str(tmp_path / 'hf' / 'discriminator')}
  ck = pretrained.load(run)
  check_fill_mask(dirs['generator'], *ck.mlm, ck.tokenizer)
  disc = transformers.AutoModelForPreTraining.from_pretrained(dirs['discriminator'])
  tok = transformers.AutoTokenizer.from_pretrained(dirs['discriminator'])
  batch = tok(['the value of the list.', 'a string'], padding=True, return_tensors='pt')
  with torch.no_grad():
    theirs = disc(**batch).logits.numpy()
  ours = jax.jit(Bert(ck.config).apply)({'params': ck.params}, jnp.asarray(batch['input_ids'].numpy()),
                               jnp.asarray(batch['attention_mask'].numpy()))['discriminator_logits_BxL']
  real = batch['attention_mask'].numpy().astype(bool)
  np.testing.assert_allclose(theirs[real], np.asarray(ours)[real], atol=1e-4)


def test_convbert_padding_difference_is_as_stated(tmp_path, caplog):
  k = 3
  run = saved_run(tmp_path / 'run', 'convbert', 'tiny', **{
      'electra.generator_fraction': 0.5, 'model.embedding_size': 16, 'model.num_layers': 1,
      'model.attention_options.convbert_kernel_size': k})
  with caplog.at_level('WARNING'):
    dirs = export.export(run, str(tmp_path / 'hf'))
  assert "posjax's padding convention" in caplog.text and 'the last 1 real tokens' in caplog.text
  assert 'Padding.' in open(os.path.join(dirs['discriminator'], export.MODEL_CARD)).read()
  ck = pretrained.load(run)
  check_fill_mask(dirs['generator'], *ck.mlm, ck.tokenizer)
  theirs = transformers.AutoModel.from_pretrained(dirs['discriminator']).eval()
  tok = transformers.AutoTokenizer.from_pretrained(dirs['discriminator'])
  batch = tok(['the value of the list of values.', 'a string of'], padding=True, return_tensors='pt')
  with torch.no_grad():
    want = theirs(**batch).last_hidden_state.numpy()
  got = np.asarray(jax.jit(Bert(ck.config).apply)({'params': ck.params}, jnp.asarray(batch['input_ids'].numpy()),
                                                  jnp.asarray(batch['attention_mask'].numpy()))['hidden_BxLxD'])
  # The unpadded row is the same; in the padded one (one layer) only the last k // 2 real tokens differ.
  np.testing.assert_allclose(got[0], want[0], atol=1e-4)
  n = int(batch['attention_mask'][1].sum())
  diff = np.abs(got[1, :n] - want[1, :n]).max(-1)
  assert np.all(diff[:n - k // 2] < 1e-4) and np.all(diff[n - k // 2:] > 1e-3), diff


@pytest.mark.parametrize('name, arg, supported', [
    ('bert', 'tiny,tisa', 'exportable: absolute, relative_key, relative_key_query'),
    pytest.param('convbert', 'tiny,none+convbert', 'exportable: absolute (ELECTRA), absolute+convbert (ConvBERT)',
                 marks=pytest.mark.slow)])
def test_variant_transformers_cannot_represent(tmp_path, capsys, name, arg, supported):
  run = saved_run(tmp_path / 'run', name, arg)
  out = tmp_path / 'hf'
  assert export.main([run, str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and err.startswith('error: ') and supported in err, err
  assert arg.split(',')[1] in err and not out.exists()


def test_a_fine_tuning_workdir_is_refused_naming_its_pretraining_run(tmp_path):
  """A fine-tuning checkpoint holds a classifier: export (and fine-tuning's init_from) say so in one line and
  name the run it started from, instead of failing on the classifier's model fields."""
  from posjax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from posjax.convert import hf  # pylint: disable=g-import-not-at-top
  from posjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  work = tmp_path / 'sst2'
  tok = tokenizer_lib.train_wordpiece(documents(40), 100)
  tokenizer_lib.save(tok, str(work))
  cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_position_embeddings=32)
  mngr = checkpoint.manager(str(work), 1)
  checkpoint.save(mngr, 1, steps.TrainState(
      step=jnp.array(1), params=hf.init_params(Bert(cfg)), opt_state=jnp.zeros(()), rng=jax.random.PRNGKey(0),
      skipped=jnp.array(0), first_bad_step=jnp.array(-1)),
      {'model': {**cfg.to_dict(), 'task': 'sst2', 'num_labels': 2}, 'config': {'init_from': '/runs/pre'}})
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(ConfigError, match=r'fine-tuning workdir \(sst2 classifier\).*\(/runs/pre\)'):
    export.export(str(work), str(tmp_path / 'out'))
