"""Fine-tuning stability of pretrained runs on SST-2 across learning rates and seeds, optionally with TISA's
radial-basis parameters frozen (the question of README "Fine-tuning stability": is a stalled TISA
fine-tuning TISA's doing?).

    python bench/finetune_stability.py --runs runs/reproduce/tisa/seed0,runs/reproduce/absolute/seed0 \\
        --lrs 1e-3,3e-3 --seeds 1,2,3,4 --freeze_tisa --out runs/stability

Each pretrained workdir is fine-tuned 500 steps at length 64 (the reproduce preset's recipe, no layer decay)
with each learning rate and seed; with --freeze_tisa, TISA runs are repeated with the amplitude, sharpness
and offset parameters held at their pretrained values (their updates scaled by 0 through the layer-wise
learning-rate multipliers of posjax.finetune.optim). Writes OUT/rows.jsonl (a row per fine-tuning: dev
accuracy, whether the predictions collapsed to one class, and for TISA how far its parameters moved) and
prints a summary; finished rows are kept and not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from posjax.finetune import finetuning, optim, presets  # noqa: E402
from posjax.training import checkpoint  # noqa: E402

TISA = ('amplitude', 'sharpness', 'offset')


def tisa_params(params) -> dict[str, np.ndarray]:
  """TISA's parameters by their path from the encoder on (a fine-tuned model nests the encoder deeper)."""
  out = {}
  for p, v in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, 'key', str(k)) for k in p]
    if keys[-1] in TISA:
      out['/'.join(keys[keys.index('encoder'):])] = np.asarray(v)
  return out


def frozen_scales(scales_fn):
  """optim.layer_scales with TISA's parameters' multipliers set to 0."""
  def scales(params, cfg, decay):
    return jax.tree_util.tree_map_with_path(
        lambda p, v: 0.0 if getattr(p[-1], 'key', None) in TISA else v, scales_fn(params, cfg, decay))
  return scales


def run_name(run, lr, seed, freeze):
  return f'{os.path.basename(os.path.normpath(run))}{"-frozen" if freeze else ""}_lr{lr:g}_s{seed}'


def finetune(run, lr, seed, freeze, out, data, steps):
  name = run_name(run, lr, seed, freeze)
  c = presets.finetune_config('sst2')
  c.data.dir, c.data.seq_len, c.num_train_steps = data, 64, steps
  # layer_scales runs only for a decay below 1; 1 - 1e-9 leaves every multiplier at 1 but the frozen ones.
  c.learning_rate, c.layer_decay, c.seed, c.init_from = lr, (1 - 1e-9) if freeze else 1.0, seed, run
  original = optim.layer_scales
  if freeze:
    optim.layer_scales = frozen_scales(original)
  try:
    wd = os.path.join(out, name)
    r = finetuning.finetune_and_evaluate(c, wd)
  finally:
    optim.layer_scales = original
  row = {'name': name, 'run': run, 'lr': lr, 'seed': seed, 'frozen': freeze, 'accuracy': r['dev'].get('accuracy'),
         'collapsed': bool(r.get('collapsed'))}
  before = tisa_params(checkpoint.read(run)[2])
  if before:
    after = tisa_params(checkpoint.read(wd)[2])
    row['tisa_max_change'] = {k: float(max(np.abs(after[n] - before[n]).max() for n in before if n.endswith(f'/{k}')))
                              for k in TISA}
  return row


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--runs', required=True, help='comma-separated pretrained posjax workdirs')
  ap.add_argument('--lrs', default='1e-3,3e-3', type=lambda s: [float(x) for x in s.split(',')])
  ap.add_argument('--seeds', default='1,2,3,4', type=lambda s: [int(x) for x in s.split(',')])
  ap.add_argument('--freeze_tisa', action='store_true')
  ap.add_argument('--data', default=os.path.join(REPO, '..', 'shared', 'data', 'sst2'), help='SST-2 directory')
  ap.add_argument('--steps', type=int, default=500)
  ap.add_argument('--out', required=True)
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'rows.jsonl')
  rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
  done = {r['name'] for r in rows}
  for run in args.runs.split(','):
    has_tisa = bool(tisa_params(checkpoint.read(run)[2]))
    for lr in args.lrs:
      for seed in args.seeds:
        for freeze in (False, True) if args.freeze_tisa and has_tisa else (False,):
          if run_name(run, lr, seed, freeze) in done:
            continue
          row = finetune(run, lr, seed, freeze, args.out, args.data, args.steps)
          rows.append(row)
          with open(path, 'a') as f:
            f.write(json.dumps(row) + '\n')
  groups = {}
  for r in rows:
    groups.setdefault((r['run'], r['frozen'], r['lr']), []).append(r['accuracy'])
  for (run, frozen, lr), accs in groups.items():
    print(f'{run}{" (TISA frozen)" if frozen else ""} lr {lr:g}: dev accuracy {statistics.mean(accs):.1f} '
          f'[{", ".join(f"{a:.1f}" for a in accs)}]')
  return 0


if __name__ == '__main__':
  sys.exit(main())
