"""Everything the CLI writes for one checkpoint: invariance numbers (JSON) and figures (PNG)."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np

from posjax.analysis import sentence as maps_lib
from posjax.analysis import invariance, plots, positional as kernels_lib
from posjax.pretrained import Pretrained as Checkpoint
from posjax.training import metrics

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


def analyze(ck: Checkpoint, out: str, length: int | None = None, sentence: str = DEFAULT_SENTENCE,
            log: Callable[[str], None] | None = None) -> dict:
  """Writes to `out`: summary.json, kernels.png, positional_attention.png (and embedding_gram.png with
  absolute positions, relative_tables.png with convq/convk), attention_maps.png (when the checkpoint has a
  tokenizer). Returns the summary with the paths of the files written under 'files'. `log` receives a line
  per figure with the panels drawn so far, their rate and the time left (drawing dominates: a BERT-base
  takes minutes for its 144-panel heatmaps)."""
  cfg, params = ck.config, ck.params
  n = min(length or 64, cfg.max_position_embeddings)
  os.makedirs(out, exist_ok=True)
  s = summary(cfg, params, n)
  s['source'], s['step'] = ck.kind, ck.step
  name = f'{cfg.attention} ({ck.kind}{"" if ck.step is None else f", step {ck.step}"})'
  path = lambda f: os.path.join(out, f)  # noqa: E731
  figures = []  # (panels, draw() -> path written)
  ks = kernels_lib.kernels(cfg, params, n)
  if any(ks):
    figures.append((len(ks), lambda: plots.kernels(ks, path('kernels.png'), f'positional kernels: {name}')))
  if s['positional_attention'] is not None:
    pa = kernels_lib.positional_attention(cfg, params, n)
    figures.append((sum(len(a) for a in pa), lambda: plots.heatmaps(
        pa, path('positional_attention.png'), f'positional attention (no content, no softmax): {name}',
        scores=s['positional_attention'], value='logit from position alone')))
  tables = kernels_lib.relative_tables(cfg, params, n)
  if any(tables):
    figures.append((sum(len(t) for t in tables), lambda: plots.tables(
        tables, path('relative_tables.png'), f'convq/convk tables: {name}')))
  p_NxD = kernels_lib.position_embeddings(cfg, params, n)
  if p_NxD is not None:
    figures.append((1, lambda: plots.heatmaps(
        [(p_NxD @ p_NxD.T)[None]], path('embedding_gram.png'), f'P P^T, tau={s["embedding_gram"]:.3f}',
        labels=['embeddings'], value='p_i . p_j')))
  if ck.tokenizer is not None:
    ids, tokens = maps_lib.tokenize(ck.tokenizer, sentence, cfg.max_position_embeddings)
    maps = maps_lib.attention_maps(cfg, params, ids)
    figures.append((sum(len(m) for m in maps), lambda: plots.heatmaps(
        maps, path('attention_maps.png'), f'attention of a sentence: {name}', tokens=tokens,
        value='attention probability')))
  total = sum(panels for panels, _ in figures)
  if log:
    log(f'{len(figures)} figures, {total} panels to draw')
  files, done, start = [], 0, time.perf_counter()
  for panels, draw in figures:
    files.append(draw())
    done += panels
    if log:
      spent = time.perf_counter() - start
      log(f'wrote {files[-1]} ({done}/{total} panels, {done / max(spent, 1e-9):.1f} panels/s, '
          f'ETA {metrics.duration(spent / done * (total - done))})')
  s['files'] = files
  with open(path('summary.json'), 'w') as f:
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
