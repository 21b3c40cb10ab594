"""Everything the CLI writes for one checkpoint: invariance numbers (JSON) and figures (PNG)."""

from __future__ import annotations

import json
import os

import numpy as np

from posjax.analysis import sentence as maps_lib
from posjax.analysis import invariance, plots, positional as kernels_lib
from posjax.pretrained import Pretrained as Checkpoint

DEFAULT_SENTENCE = 'The quick brown fox jumps over the lazy dog because it wants to see the river.'


def summary(cfg, params, n: int) -> dict:
  """Translation invariance (tau, 1 = Toeplitz) of the position embeddings' Gram matrix P P^T and, per
  layer and head, of the positional attention (embeddings and content-free score terms together) and of
  the embeddings' part alone; None where a model has no such matrix."""
  p_NxD = kernels_lib.position_embeddings(cfg, params, n)
  emb = kernels_lib.embedding_positional_attention(cfg, params, n)
  pa = kernels_lib.positional_attention(cfg, params, n)
  has_kernel = any(kernels_lib.kernels(cfg, params, 2)[0])
  tau = lambda a: [float(x) for x in invariance.translation_invariance(a)]  # noqa: E731
  return {
      'attention': cfg.attention, 'length': n,
      'embedding_gram': None if p_NxD is None else float(invariance.translation_invariance(p_NxD @ p_NxD.T)),
      'embedding_attention': None if emb is None else [tau(a) for a in emb],
      'positional_attention': [tau(a) for a in pa] if (emb is not None or has_kernel) else None,
  }


def analyze(ck: Checkpoint, out: str, length: int | None = None, sentence: str = DEFAULT_SENTENCE) -> dict:
  """Writes to `out`: summary.json, kernels.png, positional_attention.png (and embedding_gram.png with
  absolute positions, relative_tables.png with convq/convk), attention_maps.png (when the checkpoint has a
  tokenizer). Returns the summary with
  the paths of the files written under 'files'."""
  cfg, params = ck.config, ck.params
  n = min(length or 64, cfg.max_position_embeddings)
  os.makedirs(out, exist_ok=True)
  s = summary(cfg, params, n)
  s['source'], s['step'] = ck.kind, ck.step
  files = []
  ks = kernels_lib.kernels(cfg, params, n)
  name = f'{cfg.attention} ({ck.kind}{"" if ck.step is None else f", step {ck.step}"})'
  if any(ks):
    files.append(plots.kernels(ks, os.path.join(out, 'kernels.png'), f'positional kernels: {name}'))
  if s['positional_attention'] is not None:
    pa = kernels_lib.positional_attention(cfg, params, n)
    files.append(plots.heatmaps(pa, os.path.join(out, 'positional_attention.png'),
                                f'positional attention (no content, no softmax): {name}',
                                scores=s['positional_attention'], value='logit from position alone'))
  tables = kernels_lib.relative_tables(cfg, params, n)
  if any(tables):
    files.append(plots.tables(tables, os.path.join(out, 'relative_tables.png'),
                              f'convq/convk tables: {name}'))
  p_NxD = kernels_lib.position_embeddings(cfg, params, n)
  if p_NxD is not None:
    files.append(plots.heatmaps([(p_NxD @ p_NxD.T)[None]], os.path.join(out, 'embedding_gram.png'),
                                f'P P^T, tau={s["embedding_gram"]:.3f}', labels=['embeddings'],
                                value='p_i . p_j'))
  if ck.tokenizer is not None:
    ids, tokens = maps_lib.tokenize(ck.tokenizer, sentence, cfg.max_position_embeddings)
    maps = maps_lib.attention_maps(cfg, params, ids)
    files.append(plots.heatmaps(maps, os.path.join(out, 'attention_maps.png'), f'attention of a sentence: {name}',
                                tokens=tokens, value='attention probability'))
  s['files'] = files
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(s, f, indent=1)
  return s


def format_summary(s: dict) -> str:
  lines = [f'{s["attention"]} ({s["source"]}), first {s["length"]} positions; tau = 1 is fully '
           'translation-invariant']
  if s['embedding_gram'] is not None:
    lines.append(f'  position embeddings P P^T: tau = {s["embedding_gram"]:.3f}')
  if s['positional_attention'] is not None:
    for li, heads in enumerate(s['positional_attention']):
      lines.append(f'  layer {li} positional attention per head: ' + ' '.join(f'{t:.3f}' for t in heads)
                   + f'  (mean {np.mean(heads):.3f})')
  else:
    lines.append('  no content-free positional attention (no absolute embeddings or kernels)')
  lines += [f'  wrote {p}' for p in s['files']]
  return '\n'.join(lines)
