"""posjax.analysis.plots and the plot CLI: a run's curves drawn from its metrics.jsonl (the data on the axes is
the file's), heatmaps with a colour bar per panel and no panel's title over a neighbour's labels."""

import json

import numpy as np
import pytest

from posjax.analysis import plot, plots
from posjax.analysis.positional import Table


@pytest.fixture
def figures(monkeypatch):
  """The figures the plots module saves, kept open for inspection."""
  kept = []

  def keep(fig, path):
    kept.append(fig)
    fig.savefig(path, dpi=60)
    return path
  monkeypatch.setattr(plots, '_save', keep)
  yield kept
  for fig in kept:
    plots.plt.close(fig)


def write_metrics(directory, rows, torn=True):
  directory.mkdir(parents=True, exist_ok=True)
  text = ''.join(json.dumps(r) + '\n' for r in rows) + ('{"step": 9' if torn else '')
  (directory / 'metrics.jsonl').write_text(text)


def test_run_curves_from_metrics(tmp_path, figures, capsys):
  rows = []
  for step in range(5, 45, 5):
    rows.append({'step': step, 'time': 0.0, 'loss': 7 - step / 10, 'mlm_loss': 7 - step / 10, 'accuracy': step / 100,
                 'grad_norm': 1.0, 'learning_rate': 1e-3 * (1 - step / 40)})
    if step % 20 == 0:
      rows.append({'step': step, 'time': 0.0, 'eval_loss': 6.5 - step / 20, 'eval_mlm_loss': 6.5 - step / 20,
                   'eval_accuracy': step / 90})
  write_metrics(tmp_path / 'run', rows)
  assert plot.main([str(tmp_path / 'run')]) == 0
  png = tmp_path / 'run' / plot.FILE
  assert f'wrote {png}' in capsys.readouterr().out and png.stat().st_size > 5000
  fig, = figures
  panels = {ax.get_title(): ax for ax in fig.axes}
  assert list(panels) == ['loss', 'metrics', 'learning rate']
  lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
  # mlm_loss equals the loss here: drawn once.
  assert sorted(lines) == ['accuracy (held-out)', 'accuracy (train)', 'learning_rate (train)', 'loss (held-out)',
                           'loss (train)']
  train = [r for r in rows if 'loss' in r]
  np.testing.assert_array_equal(lines['loss (train)'].get_xdata(), [r['step'] for r in train])
  np.testing.assert_array_equal(lines['loss (train)'].get_ydata(), [r['loss'] for r in train])
  np.testing.assert_array_equal(lines['accuracy (held-out)'].get_ydata(),
                                [r['eval_accuracy'] for r in rows if 'eval_accuracy' in r])
  assert lines['loss (train)'].get_color() == lines['loss (held-out)'].get_color()


def test_plot_errors(tmp_path, capsys):
  assert plot.main([str(tmp_path / 'missing')]) == 2
  assert 'is not a directory' in capsys.readouterr().err
  write_metrics(tmp_path / 'glue' / 'cola', [{'step': 1, 'loss': 1.0}])
  assert plot.main([str(tmp_path / 'glue')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'its runs are in {tmp_path / "glue" / "cola"}' in err


def overlapping_text(fig):
  """(title, other) pairs where a panel's title overlaps another panel's title, tick labels, axis labels or
  plotting area."""
  fig.canvas.draw()
  r = fig.canvas.get_renderer()
  texts = {}
  for ax in fig.axes:
    items = [ax.title, ax.xaxis.label, ax.yaxis.label] + ax.get_xticklabels() + ax.get_yticklabels()
    texts[ax] = [t.get_window_extent(r) for t in items if t.get_visible() and t.get_text()]
  bad = []
  for ax in fig.axes:
    if not ax.get_title():
      continue
    title = ax.title.get_window_extent(r)
    for other in fig.axes:
      if other is not ax and any(title.overlaps(b) for b in texts[other] + [other.get_window_extent(r)]):
        bad.append((ax.get_title(), other.get_title() or other.get_label()))
  return bad


def test_heatmaps_and_tables_have_colour_bars_and_no_overlaps(tmp_path, figures):
  rng = np.random.default_rng(0)
  tokens = [f'[token{i}]' for i in range(30)]  # (the old layout put the second row's titles on these)
  plots.heatmaps([rng.normal(size=(4, 30, 30)) for _ in range(2)], str(tmp_path / 'maps.png'), 'maps',
                 tokens=tokens, value='attention probability')
  plots.heatmaps([rng.normal(size=(4, 64, 64)) for _ in range(2)], str(tmp_path / 'pa.png'), 'pa',
                 scores=[[0.5] * 4] * 2)
  q, k = (Table(v, np.arange(-8, 9), rng.normal(size=(17, 8))) for v in ('convq', 'convk'))
  plots.tables([{'convq': q, 'convk': k}] * 2, str(tmp_path / 'tables.png'), 'tables')
  for fig in figures:
    images = [ax for ax in fig.axes if ax.get_images()]
    assert len(images) in (4, 8)
    # One colour bar per image: an extra axes each.
    assert len(fig.axes) == 2 * len(images)
    assert overlapping_text(fig) == []
