"""Matplotlib figures (Agg backend: no display needed) of kernels, positional attention, attention maps and
loss curves. Each function draws one figure, writes it to `path` (PNG) and returns the path. Heatmaps carry a
colour bar each (heads differ in range)."""

from __future__ import annotations

import os
import sys

import matplotlib

# Files only, no display; but inside Jupyter keep the notebook's own (inline) backend.
if 'ipykernel' not in sys.modules and not os.environ.get('MPLBACKEND'):
  matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
  return path


def _grid(rows: int, cols: int, size=(2.6, 2.4)):
  # Constrained layout makes room for every panel's title, tick labels and colour bar and the figure's title,
  # so none overlaps its neighbours.
  fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False,
                           layout='constrained')
  return fig, axes


def _colorbar(fig, image, ax, label: str = ''):
  bar = fig.colorbar(image, ax=ax, shrink=0.85)
  bar.ax.tick_params(labelsize=6)
  if label:
    bar.set_label(label, fontsize=7)


def kernels(layers: list[dict], path: str, title: str = '') -> str:
  """One panel per layer: every head's kernel k_h(d) against d = j - i, one line style per variant."""
  fig, axes = _grid(1, max(len(layers), 1), size=(4.0, 3.0))
  styles = ['-', '--', ':', '-.']
  for li, (ax, layer) in enumerate(zip(axes[0], layers)):
    for vi, (name, k) in enumerate(sorted(layer.items())):
      few = len(k.values_HxR) <= 8  # a legend entry per head; with more, one per variant (its line style)
      for h, vals in enumerate(k.values_HxR):
        ax.plot(k.offsets_R, vals, styles[vi % len(styles)], color=f'C{h % 10}',
                label=f'{name} h{h}' if few else (f'{name} (all heads)' if h == 0 else None))
    ax.axvline(0, color='0.8', lw=0.8, zorder=0)
    ax.set_title(f'layer {li}', fontsize=9)
    ax.set_xlabel('offset d = j - i (key - query)', fontsize=8)
    if li == 0:
      ax.set_ylabel('added to the logit', fontsize=8)
    if layer and li == 0:
      ax.legend(fontsize=6, ncol=2)
  if title:
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def tables(layers: list[dict], path: str, title: str = '') -> str:
  """Rows = layers, columns = terms: each `convq`/`convk` table as channels against the offset d = j - i."""
  names = sorted({name for layer in layers for name in layer})
  fig, axes = _grid(max(len(layers), 1), max(len(names), 1), size=(4.0, 2.8))
  for li, layer in enumerate(layers):
    for ci, name in enumerate(names):
      ax = axes[li][ci]
      if name not in layer:
        ax.axis('off')
        continue
      t = layer[name]
      d, top = t.offsets_R, float(np.abs(t.values_RxDh).max()) or 1.0
      image = ax.imshow(t.values_RxDh.T, cmap='RdBu_r', vmin=-top, vmax=top, aspect='auto',
                        interpolation='nearest', extent=(d[0] - 0.5, d[-1] + 0.5, t.values_RxDh.shape[1] - 0.5, -0.5))
      _colorbar(fig, image, ax, 'added to q.r or k.r')
      ax.set_title(f'layer {li} {name}', fontsize=8)
      ax.set_xlabel('offset d = j - i (key - query)', fontsize=7)
      ax.set_ylabel('channel', fontsize=7)
      ax.tick_params(labelsize=6)
  if title:
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def heatmaps(mats_LxHxNxM: list[np.ndarray], path: str, title: str = '', labels=None, scores=None,
             tokens: list[str] | None = None, value: str = '') -> str:
  """A grid of heatmaps, rows = layers, columns = heads; `scores[l][h]` goes in the panel title, `value`
  (what the colours measure) beside the colour bars."""
  rows = len(mats_LxHxNxM)
  cols = max(m.shape[0] for m in mats_LxHxNxM) if rows else 1
  big = tokens is not None and len(tokens) > 12
  fig, axes = _grid(max(rows, 1), cols, size=(3.6, 3.3) if big else (2.6, 2.4))
  for li, m in enumerate(mats_LxHxNxM):
    for h in range(cols):
      ax = axes[li][h]
      if h >= m.shape[0]:
        ax.axis('off')
        continue
      image = ax.imshow(m[h], cmap='viridis', aspect='equal', interpolation='nearest')
      _colorbar(fig, image, ax, value)
      name = labels[li] if labels else f'layer {li}'
      t = f'{name} head {h}'
      if scores is not None:
        t += f'\ntau={scores[li][h]:.3f}'
      ax.set_title(t, fontsize=7)
      if tokens is not None:
        ax.set_xticks(range(len(tokens)))
        ax.set_xticklabels(tokens, rotation=90, fontsize=5)
        ax.set_yticks(range(len(tokens)))
        ax.set_yticklabels(tokens, fontsize=5)
      else:
        ax.tick_params(labelsize=6)
  if title:
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def _over_seeds(runs: list[dict[str, list]], step: str, value: str):
  """(steps every run logged, mean, min, max) of `value` across `runs`."""
  common = sorted(set.intersection(*(set(r[step]) for r in runs))) if runs else []
  table = np.asarray([[dict(zip(r[step], r[value]))[s] for s in common] for r in runs], np.float64)
  if not common:
    return common, *([np.zeros(0)] * 3)
  return common, table.mean(0), table.min(0), table.max(0)


def loss_curves(runs: dict[str, dict[str, list] | list[dict[str, list]]], path: str, title: str = '') -> str:
  """`runs[name]` = {'step': [...], 'loss': [...], 'eval_step': [...], 'eval_loss': [...]}, or a list of such
  (one per seed: their mean is drawn, their range shaded): training loss as lines, held-out loss as markers
  of the same colour."""
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for i, (name, r) in enumerate(runs.items()):
    seeds = r if isinstance(r, list) else [r]
    steps, mean, lo, hi = _over_seeds(seeds, 'step', 'loss')
    n = f', {len(seeds)} seeds' if len(seeds) > 1 else ''
    ax.plot(steps, mean, color=f'C{i}', label=f'{name} (train{n})')
    if len(seeds) > 1:
      ax.fill_between(steps, lo, hi, color=f'C{i}', alpha=0.2, lw=0)
    steps, mean, lo, hi = _over_seeds(seeds, 'eval_step', 'eval_loss')
    if steps:
      ax.errorbar(steps, mean, yerr=[mean - lo, hi - mean] if len(seeds) > 1 else None, fmt='o--',
                  color=f'C{i}', capsize=3, label=f'{name} (held-out)')
  ax.set_xlabel('step')
  ax.set_ylabel('MLM loss')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)
  return _save(fig, path)


def run_curves(rows: list[dict], path: str, title: str = '') -> str:
  """One run's metrics.jsonl rows against the step, in up to three panels: the losses, the other metrics
  (accuracies, a GLUE task's dev metrics, ...) and the learning rate. A training metric is a line,
  its held-out `eval_*` twin markers of the same colour; a part of the loss equal to the whole (`mlm_loss` of
  an MLM-only run) is left out."""
  def series(k):
    return [(r['step'], r[k]) for r in rows if r.get(k) is not None]

  keys = sorted({k for r in rows for k in r if k not in ('step', 'time')})
  base = lambda k: k[len('eval_'):] if k.startswith('eval_') else k  # noqa: E731
  whole = {k: series(k) for k in ('loss', 'eval_loss')}
  losses = [k for k in keys if base(k) == 'loss' or (
      k.endswith('_loss') and series(k) != whole['eval_loss' if k.startswith('eval_') else 'loss'])]
  others = [k for k in keys if not k.endswith('loss') and base(k) not in ('learning_rate', 'grad_norm',
                                                                        'skipped_updates')]
  panels = [(t, names) for t, names in (('loss', losses), ('metrics', others),
                                        ('learning rate', [k for k in keys if k == 'learning_rate'])) if names]
  fig, axes = _grid(1, max(len(panels), 1), size=(4.6, 3.4))
  for ax, (panel, names) in zip(axes[0], panels):
    names = sorted(names, key=lambda k: (base(k) != 'loss', base(k), k.startswith('eval_')))
    colours = {b: f'C{i % 10}' for i, b in enumerate(dict.fromkeys(map(base, names)))}
    for k in names:
      steps, values = zip(*series(k))
      held_out = k.startswith('eval_')
      ax.plot(steps, values, 'o--' if held_out or len(steps) == 1 else '-', color=colours[base(k)], ms=4,
              lw=1.6 if base(k) == 'loss' else 1.0, label=f'{base(k)} ({"held-out" if held_out else "train"})')
    ax.set_title(panel, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if panel != 'learning rate':
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)
