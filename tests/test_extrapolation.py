"""Length extrapolation: the MLM scoring matches transformers' BertForMaskedLM, absolute embeddings get a
'cannot run' row past their table, and the CLI evaluates a pretraining workdir."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posjax import pretrained
from posjax.analysis import extrapolation
from posjax.config import ModelConfig
from posjax.convert import hf, hf_bert
from posjax.data import pretrain
from posjax.data import tokenizer as tokenizer_lib
from posjax.models import Bert
from posjax.training import checkpoint, steps

SPECIALS = pretrain.Specials(pad=0, unk=1, cls=2, sep=3, mask=4)


def tiny(attention='absolute', **kw):
  return ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                     max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, attention=attention,
                     **kw)


def stream(n=2000, seed=0):
  return np.random.default_rng(seed).integers(5, 50, n).astype(np.int32)


def test_scores_match_transformers_masked_lm(tmp_path):
  import torch
  import transformers
  cfg = tiny()
  params = hf.init_params(Bert(cfg), seed=1)
  hf_bert.export_bert(cfg, params, str(tmp_path))
  theirs = transformers.BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
  text = stream()
  rows = extrapolation.evaluate_model(cfg, params, text, SPECIALS, train_len=16, multiples=(1, 2), max_tokens=512,
                                      batch_tokens=128, seed=3)
  for row in rows:
    length = row['length']
    ids = extrapolation.rows_of_length(text, length, SPECIALS, 512 // length)
    b = pretrain.mask_tokens(ids, np.random.default_rng([3, length]), SPECIALS, cfg.vocab_size)
    with torch.no_grad():
      logits = theirs(input_ids=torch.tensor(b['ids'], dtype=torch.long),
                      attention_mask=torch.tensor(b['mask'], dtype=torch.long)).logits.numpy()
    picked = np.take_along_axis(logits, b['positions'][..., None], axis=1)
    logp = picked - np.log(np.exp(picked - picked.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        picked.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, b['labels'][..., None], axis=-1)[..., 0]
    w = b['weights']
    assert row['tokens'] == int(w.sum())
    assert row['loss'] == pytest.approx(float((nll * w).sum() / w.sum()), rel=1e-4)
    assert row['accuracy'] == pytest.approx(float(((picked.argmax(-1) == b['labels']) * w).sum() / w.sum()))


def test_absolute_past_its_table_is_a_row_not_a_crash():
  text = stream()
  cfg = tiny('absolute')
  rows = extrapolation.evaluate_model(cfg, hf.init_params(Bert(cfg)), text, SPECIALS, 16, (1, 4), max_tokens=256,
                                      batch_tokens=64)
  assert rows[0]['loss'] is not None and np.isfinite(rows[0]['loss']) and rows[0]['note'] == ''
  assert rows[1]['loss'] is None and rows[1]['length'] == 64
  assert 'cannot run: the absolute position embedding has 32 rows' in rows[1]['note']
  # Past the table nothing is computed, so no parameters are needed to say so.
  rows = extrapolation.evaluate_model(tiny('sinusoidal'), None, text, SPECIALS, 16, (4,))
  assert rows[0]['loss'] is None and 'the sinusoidal position embedding has 32 rows' in rows[0]['note']
  assert '| - | - | 0 | cannot run' in extrapolation.format_table(rows)


def test_cli_on_a_pretraining_workdir(tmp_path, capsys, monkeypatch):
  """A workdir as the trainer leaves it (checkpoint with meta, tokenizer, corpus files) evaluated by the CLI."""
  rng = np.random.default_rng(0)
  words = 'the a cat dog sat ran on under mat log and then it was big small'.split()
  docs = [' '.join(rng.choice(words, 60)) for _ in range(40)]
  files = tmp_path / 'docs.jsonl'
  files.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  work = tmp_path / 'run'
  tok = tokenizer_lib.train_wordpiece(docs, 100)
  tokenizer_lib.save(tok, str(work))
  cfg = dataclasses.replace(tiny('t5'), vocab_size=tok.get_vocab_size())
  state = steps.TrainState(step=jnp.array(5), params=hf.init_params(Bert(cfg)), opt_state=jnp.zeros(()),
                           rng=jax.random.PRNGKey(0), skipped=jnp.array(0), first_bad_step=jnp.array(-1))
  meta = {'model': {**cfg.to_dict(), 'objective': 'mlm'},
          'config': {'seed': 0, 'data': {'files': str(files), 'text_field': 'text', 'seq_len': 16,
                                         'eval_fraction': 0.5}}}
  mngr = checkpoint.manager(str(work), 1)
  checkpoint.save(mngr, 5, state, meta)
  mngr.wait_until_finished()
  mngr.close()
  out_json = tmp_path / 'rows.json'
  assert extrapolation.main([str(work), '--multiples=1,2', '--max_tokens=256', f'--output={out_json}']) == 0
  table = capsys.readouterr().out
  assert '| run | `t5` | 16 | 1 |' in table and '| run | `t5` | 32 | 2 |' in table
  rows = json.loads(out_json.read_text())
  assert [r['length'] for r in rows] == [16, 32] and all(r['tokens'] > 0 for r in rows)
  assert all(np.isfinite(r['loss']) and r['note'] == '' for r in rows)  # t5 buckets: no length limit
  # The text is the trainer's own held-out half: documents the split put aside, none it trained on.
  held = list(extrapolation.held_out_text(meta['config'], str(work)))
  assert held and set(held) <= set(docs) and len(held) < len(docs)
  from posjax.data import sources
  assert held == [d for d, h in zip(docs, sources.held_out(len(docs), 0, 0.5)) if h]
  # ... tokenised only as far as the evaluation reads: max_tokens and a little more, never the whole split.
  tok = pretrained.load(str(work)).tokenizer
  whole = extrapolation.token_stream(tok, held, 3, 10 ** 9)
  head = extrapolation.token_stream(tok, held, 3, 40, block=2)
  assert 40 <= len(head) < len(whole) and head.tobytes() == whole[:len(head)].tobytes()
  # A length longer than max_tokens still gets its one row (the stream is read that far), documents read one
  # at a time here so that the stream stops where it may.
  import functools
  monkeypatch.setattr(extrapolation, 'token_stream', functools.partial(extrapolation.token_stream, block=1))
  assert extrapolation.main([str(work), '--multiples=1,40', '--max_tokens=100', f'--output={out_json}']) == 0
  rows = json.loads(out_json.read_text())
  assert [r['length'] for r in rows] == [16, 640] and rows[1]['tokens'] > 0, rows
  assert extrapolation.main([str(tmp_path / 'nothing')]) == 2
  assert 'not a posjax pretraining workdir' in capsys.readouterr().err
