"""posjax.analysis: the translation-invariance measure against an independent least-squares Toeplitz fit,
kernels against the parameters they were given and NumPy transcriptions of each term's formula, positional
attention and attention maps against transformers' BERT."""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import toeplitz

from posjax import analysis
from posjax.analysis import __main__ as cli
from posjax.analysis import positional
from posjax.attention.composite import ConvDynamic
from posjax.attention.t5 import relative_position_bucket
from posjax.config import ModelConfig


def tau_by_least_squares(a):
  """Independent transcription: fit the best Toeplitz matrix by least squares over the 2n-1 diagonal
  indicator matrices, then 1 - residual / total sum of squares about the mean."""
  n, m = a.shape
  basis = []
  for d in range(-(n - 1), m):
    b = np.zeros((n, m))
    for i in range(n):
      if 0 <= i + d < m:
        b[i, i + d] = 1.0
    basis.append(b.ravel())
  coef, *_ = np.linalg.lstsq(np.stack(basis, 1), a.ravel(), rcond=None)
  fit = (np.stack(basis, 1) @ coef).reshape(n, m)
  return 1.0 - ((a - fit) ** 2).sum() / ((a - a.mean()) ** 2).sum(), fit


def test_toeplitz_scores_one_and_noise_scores_low():
  rng = np.random.default_rng(0)
  col, row = rng.normal(size=24), rng.normal(size=24)
  row[0] = col[0]
  assert analysis.translation_invariance(toeplitz(col, row)) == pytest.approx(1.0, abs=1e-12)
  assert analysis.translation_invariance(np.full((5, 5), 3.0)) == 1.0
  noise = analysis.translation_invariance(rng.normal(size=(200, 24, 24)))
  expected = (2 * 24 - 2) / (24 * 24 - 1)  # the share of degrees of freedom the diagonal means absorb
  assert noise.shape == (200,)
  assert noise.max() < 0.2
  assert noise.mean() == pytest.approx(expected, rel=0.1)
  # Part Toeplitz, part noise: in between.
  mixed = analysis.translation_invariance(toeplitz(col, row) + 0.5 * rng.normal(size=(24, 24)))
  assert 0.3 < mixed < 0.95


@pytest.mark.parametrize('shape', [(4, 4), (3, 5), (6, 2)])
def test_measure_equals_least_squares_transcription(shape):
  a = np.random.default_rng(sum(shape)).normal(size=shape)
  tau, fit = tau_by_least_squares(a)
  np.testing.assert_allclose(analysis.toeplitz_projection(a), fit, atol=1e-12)
  assert float(analysis.translation_invariance(a)) == pytest.approx(tau, abs=1e-12)
  # Unchanged by scale and offset (the 1/sqrt(Dh) and global biases do not matter).
  assert float(analysis.translation_invariance(3.0 * a - 7.0)) == pytest.approx(tau, abs=1e-12)
  # Diagonal means by offset d = j - i, from -(n-1).
  n, m = shape
  by_hand = [np.mean([a[i, i + d] for i in range(n) if 0 <= i + d < m]) for d in range(-(n - 1), m)]
  np.testing.assert_allclose(analysis.diagonal_means(a), by_hand, atol=1e-12)


def micro(attention, **kw):
  kw = {'num_layers': 2, **kw}
  return ModelConfig(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=32,
                     max_position_embeddings=24, attention=attention, **kw)


# NumPy transcriptions (float64) of each content-free term's kernel over offsets d = j - i, written from the
# formulas in the modules' docstrings (the oracles for the components' `offsets` functions).
def np_tisa(p, d_R):
  a, b, c = (np.asarray(p[k], np.float64)[..., None] for k in ('amplitude', 'sharpness', 'offset'))
  return (a * np.exp(-np.abs(b) * (-d_R - c) ** 2)).sum(axis=0)  # f evaluated at i - j = -d


def np_convfixed(p, d_R, k):
  return np.asarray(p['kernel'], np.float64)[:, np.clip(d_R, -k, k) + k]


def np_t5(p, d_R, num_buckets, max_distance):  # buckets checked against transformers in test_relative.py
  return np.asarray(p['relative_attention_bias'], np.float64)[
      relative_position_bucket(d_R, num_buckets, max_distance)].T


def np_alibi(slopes, d_R):
  return -np.asarray(slopes, np.float64)[:, None] * np.abs(d_R)[None, :]


def test_kernels_return_the_parameters_given_and_the_terms_formulas():
  cfg = micro('tisa+convfixed+t5+alibi', attention_options=(
      ('tisa_kernels', 3), ('composite_kernel_size', 5), ('t5_num_buckets', 8), ('t5_max_distance', 12)))
  # Only what the kernels read (a whole model's other parameters play no part).
  params = {'encoder': {'layer_0': {'attention': {}}, 'layer_1': {'attention': {}}}}
  rng = np.random.default_rng(1)
  given = []
  for layer in ('layer_0', 'layer_1'):
    att = params['encoder'][layer]['attention']
    mine = {'tisa': {k: rng.normal(size=(3, 2)).astype(np.float32) for k in ('amplitude', 'sharpness', 'offset')},
            'convfixed': {'kernel': rng.normal(size=(2, 5)).astype(np.float32)},
            't5': {'relative_attention_bias': rng.normal(size=(8, 2)).astype(np.float32)}}
    att.update(mine)
    given.append(mine)
  n = 10
  ks = analysis.kernels(cfg, params, n)
  d_R = np.arange(-(n - 1), n)
  for li, mine in enumerate(given):
    k = ks[li]
    assert sorted(k) == ['alibi', 'convfixed', 't5', 'tisa']
    for name in ('tisa', 'convfixed', 't5'):
      np.testing.assert_array_equal(k[name].offsets_R, d_R)
      for pname, value in mine[name].items():
        np.testing.assert_array_equal(k[name].params[pname], value)
    assert k['alibi'].params == {}
    np.testing.assert_array_equal(k['convfixed'].values_HxR[:, n - 1 - 2:n + 2], mine['convfixed']['kernel'])
    # TISA by hand at one head and offset: f(i - j) = f(-d).
    a, b, c = (mine['tisa'][x][:, 1].astype(np.float64) for x in ('amplitude', 'sharpness', 'offset'))
    d = 3
    assert k['tisa'].values_HxR[1, d + n - 1] == pytest.approx(np.sum(a * np.exp(-np.abs(b) * (-d - c) ** 2)),
                                                               rel=1e-5)
    oracles = {'tisa': np_tisa(mine['tisa'], d_R), 'convfixed': np_convfixed(mine['convfixed'], d_R, 2),
               't5': np_t5(mine['t5'], d_R, 8, 12), 'alibi': np_alibi([2.0 ** -4, 2.0 ** -8], d_R)}
    for name, want in oracles.items():
      np.testing.assert_allclose(k[name].values_HxR, want, atol=1e-6, rtol=1e-6, err_msg=name)
    pa = analysis.positional_attention(cfg, params, n)[li]
    idx = np.arange(n)[None, :] - np.arange(n)[:, None] + n - 1  # [i, j] -> column of offset j - i
    np.testing.assert_allclose(pa, sum(oracles.values())[:, idx], atol=1e-5)
    assert analysis.translation_invariance(pa) == pytest.approx([1.0, 1.0])


def test_relative_tables_are_the_modules_logits_by_offset(tmp_path):
  """convq/convk tables spread over (i, j) are each module's logits for unit-vector queries/keys, in the
  documented orientation (convk reads row clip(i - j) + k); the report draws them."""
  cfg = micro('none+convq+convk', attention_options=(('composite_kernel_size', 5),))
  rng = np.random.default_rng(4)
  mine = {name: {'kernel': rng.normal(size=(5, 8)).astype(np.float32)} for name in ('convq', 'convk')}
  params = {'encoder': {f'layer_{i}': {'attention': mine} for i in range(2)}}
  n = 9
  tables = analysis.relative_tables(cfg, params, n)
  assert len(tables) == 2 and sorted(tables[0]) == ['convk', 'convq']
  idx = np.arange(n)[None, :] - np.arange(n)[:, None] + n - 1  # [i, j] -> the index of offset j - i
  mask = jnp.ones((1, n), bool)
  for name, from_keys in (('convq', False), ('convk', True)):
    t = tables[0][name]
    np.testing.assert_array_equal(t.offsets_R, np.arange(-(n - 1), n))
    for c in range(8):
      x = jnp.zeros((1, n, 2, 8)).at[..., c].set(1.0)  # every query and key is the unit vector e_c
      term = ConvDynamic(cfg, from_keys=from_keys).apply({'params': mine[name]}, x, x, mask)[0, 0]
      np.testing.assert_allclose(t.values_RxDh[:, c][idx] / np.sqrt(8), term, atol=1e-6, err_msg=name)
  # By hand, offset d = j - i = +1 (index n): convq reads row clip(1) + 2 = 3, convk row clip(-1) + 2 = 1.
  np.testing.assert_array_equal(tables[1]['convq'].values_RxDh[n], mine['convq']['kernel'][3])
  np.testing.assert_array_equal(tables[1]['convk'].values_RxDh[n], mine['convk']['kernel'][1])
  s = analysis.analyze(analysis.Checkpoint(cfg, params, None, 'posjax'), str(tmp_path), 8)
  assert str(tmp_path / 'relative_tables.png') in s['files']
  assert (tmp_path / 'relative_tables.png').stat().st_size > 1000


def test_absolute_positional_attention_by_hand_and_sinusoidal_gram_is_toeplitz():
  cfg = micro('absolute')
  rng = np.random.default_rng(2)
  w = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  params = {'embeddings': {'position_embeddings': {'embedding': w(24, 16)}},
            'encoder': {f'layer_{i}': {'attention': {'query': {'kernel': w(16, 2, 8)},
                                                     'key': {'kernel': w(16, 2, 8)}}} for i in range(2)}}
  n = 7
  p = np.asarray(params['embeddings']['position_embeddings']['embedding'], np.float64)[:n]
  att = params['encoder']['layer_1']['attention']
  wq, wk = (np.asarray(att[x]['kernel'], np.float64) for x in ('query', 'key'))
  pa = analysis.embedding_positional_attention(cfg, params, n)[1]
  for h in range(2):
    for i in range(n):
      for j in range(n):
        want = sum(p[i] @ wq[:, h, e] * (p[j] @ wk[:, h, e]) for e in range(8)) / np.sqrt(8)
        assert pa[h, i, j] == pytest.approx(want, rel=1e-9, abs=1e-12)
  eff = analysis.kernels(cfg, params, n)[1]['absolute'].values_HxR
  np.testing.assert_allclose(eff, analysis.diagonal_means(pa))
  s = analysis.summary(dataclasses.replace(cfg, attention='sinusoidal'), params, 20)
  assert s['embedding_gram'] == pytest.approx(1.0, abs=1e-9)  # sin/cos inner products depend on i - j only
  assert analysis.summary(micro('none'), {'encoder': params['encoder']}, 8)['positional_attention'] is None
  # Convolved queries or keys are no longer P W_q, P W_k: nothing to report; convolved values change nothing.
  assert analysis.embedding_positional_attention(micro('absolute+convqkv'), params, n) is None
  values = micro('absolute+convqkv', attention_options=(('convqkv_targets', 'v'),))
  np.testing.assert_array_equal(analysis.embedding_positional_attention(values, params, n)[1], pa)


def test_electra_and_albert_layouts():
  cfg = micro('absolute', layer_groups=1, num_layers=3)
  assert positional.layer_names(cfg) == ['layer_0']  # ALBERT: one shared parameter set
  rng = np.random.default_rng(3)
  w = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  emb = {'position_embeddings': {'embedding': w(24, 16)}}
  enc = {'layer_0': {'attention': {'query': {'kernel': w(16, 2, 8)}, 'key': {'kernel': w(16, 2, 8)}}}}
  # An ELECTRA pretraining run: the discriminator's encoder with the shared embeddings.
  electra = {'embeddings': emb, 'discriminator': {'encoder': enc}, 'generator': {'encoder': {}}}
  np.testing.assert_array_equal(analysis.positional_attention(cfg, electra, 6)[0],
                                analysis.positional_attention(cfg, {'embeddings': emb, 'encoder': enc}, 6)[0])


def test_hf_bert_checkpoint_against_transformers(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hcfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=24, max_position_embeddings=32,
                                 attn_implementation='eager')
  model = transformers.BertModel(hcfg).eval()
  with torch.no_grad():
    for prm in model.parameters():
      prm.add_(0.1 * torch.randn_like(prm))
  model.save_pretrained(tmp_path)
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(35)]
  (tmp_path / 'vocab.txt').write_text('\n'.join(words) + '\n')

  ck = analysis.load(str(tmp_path))
  assert ck.kind == 'hf:bert'
  ids, tokens = analysis.tokenize(ck.tokenizer, 'w3 w17 w5 w30 w2', 32)
  assert tokens == ['[CLS]', 'w3', 'w17', 'w5', 'w30', 'w2', '[SEP]']
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids[None].astype(np.int64)), output_attentions=True).attentions
  ours = analysis.attention_maps(ck.config, ck.params, ids)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b[0].numpy(), atol=1e-5)

  # Positional attention from transformers' own tensors: (P W_q^T)(P W_k^T)^T per head / sqrt(Dh).
  n = 9
  sd = model.state_dict()
  p = sd['embeddings.position_embeddings.weight'][:n].double()
  for li in range(2):
    q = (p @ sd[f'encoder.layer.{li}.attention.self.query.weight'].double().T).reshape(n, 2, 8)
    k = (p @ sd[f'encoder.layer.{li}.attention.self.key.weight'].double().T).reshape(n, 2, 8)
    want = torch.einsum('ihd,jhd->hij', q, k).numpy() / np.sqrt(8)
    np.testing.assert_allclose(analysis.positional_attention(ck.config, ck.params, n)[li], want, atol=1e-9)

  out = tmp_path / 'figs'
  assert cli.main(['--checkpoint', str(tmp_path), '--out', str(out), '--length', '12']) == 0
  for name in ('kernels.png', 'positional_attention.png', 'embedding_gram.png', 'attention_maps.png',
               'summary.json'):
    assert (out / name).stat().st_size > 1000 or name == 'summary.json'
  captured = capsys.readouterr()
  assert 'positional attention per head' in captured.out
  # Progress on stderr: the plan, then a line per figure with panels so far, their rate and the time left.
  progress = [line for line in captured.err.splitlines() if line.startswith('[analysis] ')]
  assert progress[0] == '[analysis] 4 figures, 11 panels to draw'  # kernels 2 layers, 2x2 heads, P P^T, 2x2 heads
  assert len(progress) == 5 and all(re.search(r'\(\d+/11 panels, [\d.]+ panels/s, ETA \d+m\d\ds\)$', line)
                                     for line in progress[1:]), progress
  assert progress[-1].startswith(f'[analysis] wrote {out}') and '(11/11 panels' in progress[-1]
  assert progress[-1].endswith('ETA 0m00s)')


def test_cli_refuses_a_directory_that_is_no_checkpoint(tmp_path, capsys):
  assert cli.main(['--checkpoint', str(tmp_path), '--out', str(tmp_path / 'o')]) == 2
  assert 'neither a Hugging Face checkpoint (no config.json) nor a posjax workdir' in capsys.readouterr().err
