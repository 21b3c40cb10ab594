"""GLUE's official metrics in NumPy, and the GLUE score.

Each task has one or two metrics (Wang et al. 2019): CoLA Matthews correlation; MRPC and QQP F1 and accuracy;
STS-B Pearson and Spearman correlation; MNLI accuracy on the matched and mismatched dev sets; the others
accuracy. All are reported x100, as the papers do.

GLUE score (`glue_score`): a task's score is the unweighted mean of its metrics (MNLI: of matched and
mismatched accuracy), and the GLUE score the unweighted mean of the task scores, as on the GLUE leaderboard.
BERT's and ELECTRA's dev-set tables leave WNLI out (its dev set is adversarial to majority-class tricks), so
`glue_score` reports both: `glue` over the tasks present without WNLI and `glue_with_wnli` with it.
"""

from __future__ import annotations

import numpy as np


def accuracy(pred, label) -> float:
  return float(np.mean(np.asarray(pred) == np.asarray(label)))


def f1(pred, label) -> float:
  """F1 of the positive class (label 1), 0 when there is no true positive."""
  pred, label = np.asarray(pred) == 1, np.asarray(label) == 1
  tp = float(np.sum(pred & label))
  denom = float(np.sum(pred) + np.sum(label))
  return 2 * tp / denom if denom else 0.0


def matthews(pred, label) -> float:
  """Matthews correlation of binary predictions; 0 when a row or column of the confusion matrix is empty."""
  pred, label = np.asarray(pred) == 1, np.asarray(label) == 1
  tp = float(np.sum(pred & label))
  tn = float(np.sum(~pred & ~label))
  fp = float(np.sum(pred & ~label))
  fn = float(np.sum(~pred & label))
  denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt((x * x).sum() * (y * y).sum())
  return float((x * y).sum() / denom) if denom else 0.0


def _ranks(x) -> np.ndarray:
  """Ranks 1..n with ties given their mean rank (what Spearman's rho needs)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind='stable')
  sorted_x = x[order]
  ranks = np.empty(len(x), np.float64)
  # Runs of equal values share the mean of the positions they span.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + e + 1) / 2.0
  return ranks


def spearman(x, y) -> float:
  return pearson(_ranks(x), _ranks(y))


# task -> (metric name, function) pairs; the first is the one papers quote when they quote one.
METRICS = {
    'cola': (('mcc', matthews),),
    'sst2': (('accuracy', accuracy),),
    'mrpc': (('f1', f1), ('accuracy', accuracy)),
    'stsb': (('pearson', pearson), ('spearman', spearman)),
    'qqp': (('accuracy', accuracy), ('f1', f1)),
    'mnli': (('accuracy', accuracy),),  # per dev set: matched and mismatched
    'qnli': (('accuracy', accuracy),),
    'rte': (('accuracy', accuracy),),
    'wnli': (('accuracy', accuracy),),
    'imdb': (('accuracy', accuracy),),
}


def task_metrics(task: str, pred, label) -> dict[str, float]:
  """{metric: value x 100} for one dev set."""
  return {name: 100.0 * fn(pred, label) for name, fn in METRICS[task]}


def task_score(task: str, results: dict[str, dict[str, float]]) -> float:
  """Mean over a task's dev sets (MNLI: matched, mismatched) of the mean of its metrics."""
  return float(np.mean([np.mean(list(m.values())) for m in results.values()]))


GLUE_TASKS = ('cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'mnli', 'qnli', 'rte', 'wnli')


def glue_score(scores: dict[str, float]) -> dict[str, float]:
  """`scores`: {task: task_score}. Returns the GLUE averages over the GLUE tasks present (see module doc)."""
  glue = [scores[t] for t in GLUE_TASKS if t in scores]
  without = [scores[t] for t in GLUE_TASKS if t in scores and t != 'wnli']
  out = {}
  if without:
    out['glue'] = float(np.mean(without))
  if glue:
    out['glue_with_wnli'] = float(np.mean(glue))
  out['tasks'] = len(glue)
  return out
