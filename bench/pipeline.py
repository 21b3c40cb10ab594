"""Is the input pipeline fast enough? Examples/s of the pipeline next to examples/s of the train step it feeds.

    python bench/pipeline.py [--files='corpus/*.jsonl.gz'] [--steps=3] [--batches=200]

On this machine's CPUs: the pipeline (the local corpus builder's prepared dataset -> batched WordPiece
tokenisation into pieces on disk, then the grain loader's examples and masked batches) and a jitted BERT-base MLM train step (batch 32, sequence 128, vocabulary 30522),
each timed in the same process. The pipeline must be at least 5x faster than the step. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from posjax.config import ModelConfig  # noqa: E402
from posjax.data import pieces, pipeline, pretrain, sources, tokenizer  # noqa: E402
from posjax.models import Bert  # noqa: E402
from posjax.training import defaults, objectives, steps  # noqa: E402

BATCH, SEQ_LEN = 32, 128


def bench_pipeline(data, batches: int, worker_count: int, task: str | None):
  with tempfile.TemporaryDirectory() as work:
    data.data_dir = os.path.join(work, 'tfds')
    documents = sources.open_documents(data, work)  # the local corpus builder's ArrayRecord dataset
    held_out = sources.held_out(len(documents), 0, 0.05)
    tok = tokenizer.train_wordpiece(documents.iter_texts(np.flatnonzero(~held_out), collections.Counter()), 8192)
    specials = pretrain.Specials.from_tokenizer_ids(tokenizer.special_ids(tok))
    t = time.perf_counter()
    stats = pieces.prepare(documents, held_out, tok, pretrain.body_length(SEQ_LEN, task), os.path.join(work, 'p'))
    prepare_s = time.perf_counter() - t
    examples = pipeline.PieceExamples(pieces.Pieces(os.path.join(work, 'p'), 'train'), SEQ_LEN, specials, task)
    masking = pipeline.Masking(specials, tok.get_vocab_size())
    ds = pipeline.train_dataset(examples, BATCH, 0, masking, grain.sharding.NoSharding())
    it = pipeline.iterator(ds, worker_count)
    next(it)  # start-up (threads, worker processes) is not throughput
    t = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    load_s = time.perf_counter() - t
    it.close()
  n = len(examples)
  # Tokenising streams the corpus: this stays flat as the corpus grows (the BERT step below is not counted).
  peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {'records': len(documents), 'pipeline_peak_rss_mb': peak_rss_mb, 'examples': n, 'tokens': stats['tokens']['train'],
          'tokenize_examples_per_s': n / prepare_s, 'loader_examples_per_s': batches * BATCH / load_s,
          # A whole epoch, its tokenisation included, over the time it takes.
          'end_to_end_examples_per_s': n / (prepare_s + n / (batches * BATCH / load_s))}, batch


def bench_step(batch, timed_steps: int):
  cfg = ModelConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
  objective = objectives.MaskedLM(Bert(cfg), SEQ_LEN, batch['positions'].shape[1])
  tx = optax.adamw(1e-4)
  state = jax.jit(lambda: nn.unbox(steps.init_state(tx, 0, steps.init_params(objective, 0))))()
  step = jax.jit(functools.partial(steps.train_step, objective=objective, tx=tx, lr_schedule=lambda s: 1e-4),
                 donate_argnums=0)
  state, m = step(state, batch)  # compile
  jax.block_until_ready(m)
  times = []
  for _ in range(timed_steps):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return {'bert_base_step_s': float(np.median(times)), 'bert_base_examples_per_s': BATCH / float(np.median(times))}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--files', default='', help='glob pattern(s); default: the offline default corpus')
  p.add_argument('--text_field', default='text')
  p.add_argument('--batches', type=int, default=200)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--worker_count', type=int, default=0)
  p.add_argument('--task', default='', choices=('', 'nsp', 'sop'), help='sentence pairs (BERT NSP, ALBERT SOP)')
  args = p.parse_args()
  data = defaults.pretraining_config(model_type='bert', objective='mlm', small=True,
                                     model=defaults.model_fields()).data
  data.update(source='files' if args.files else 'default', files=args.files, text_field=args.text_field)
  out, batch = bench_pipeline(data, args.batches, args.worker_count, args.task or None)
  batch = {k: v for k, v in batch.items() if k not in ('type_ids', 'sentence_labels')}  # the MLM step's inputs
  out.update(bench_step(batch, args.steps))
  out['cpus'] = os.cpu_count()
  out['load_average_1min'] = os.getloadavg()[0]
  for k in ('loader', 'end_to_end'):
    out[f'{k}_over_step'] = out[f'{k}_examples_per_s'] / out['bert_base_examples_per_s']
  print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))
  ok = out['end_to_end_over_step'] >= 5
  print(f"pipeline {out['end_to_end_examples_per_s']:.0f} examples/s end to end ({out['loader_examples_per_s']:.0f} "
        f"from the loader), BERT-base step {out['bert_base_examples_per_s']:.1f} examples/s: "
        f"{out['end_to_end_over_step']:.0f}x ({'ok' if ok else 'BELOW 5x'})")
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
