"""The fields every trainer config shares (`trainer_config`), and those of pretraining (`pretraining_config`),
which the model configs in posjax/configs start from.

Model heads (MLM, pooler, NSP/SOP, ELECTRA discriminator) are not config fields: the trainer derives them
from `objective`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from posjax.attention import registry
from posjax.config import ModelConfig

_HEAD_FIELDS = ('mlm_head', 'mlm_head_act', 'pooler', 'sentence_head', 'discriminator_head')


def model_fields(**overrides) -> ml_collections.ConfigDict:
  """Every ModelConfig field (bar the heads) with its default, then `overrides`."""
  d = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name not in _HEAD_FIELDS}
  # vocab 0: the tokenizer's size rounded up to a multiple of 128 (so mesh axes divide it)
  d.update(vocab_size=0, dtype='float32', param_dtype='float32')
  d['attention_options'] = ml_collections.ConfigDict(registry.default_options())
  unknown = set(overrides) - set(d)
  if unknown:
    raise KeyError(f'not model fields: {sorted(unknown)}')
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def pretraining_config(*, model_type: str, objective: str, small: bool,
                       model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_type = model_type
  c.objective = objective  # one of posjax.training.objectives.OBJECTIVES
  c.model = model

  c.data = ml_collections.ConfigDict(dict(
      # Where documents come from (posjax/data/sources.py), always through a prepared tfds dataset in
      # data_dir: 'default' (the offline default corpus, or data.files when set), 'files' (data.files) or
      # 'tfds' (the catalog dataset tfds_name, its split tfds_split and text feature text_feature).
      source='default',
      files='',  # glob pattern(s), comma-separated, of .txt / .jsonl / .tsv files, gzip or not
      text_field='text',  # the text field of JSON-lines records, the text column of TSV files
      tfds_name='',  # e.g. 'imdb_reviews', 'wikipedia/20230601.en'; prepared beforehand, never downloaded
      tfds_split='train',
      text_feature='text',
      data_dir='',  # tfds data dir; empty: $TFDS_DATA_DIR, else WORKDIR/tensorflow_datasets
      # tokenizer.json / vocab.txt / HF directory / SentencePiece .model; empty: train one (tokenizer_kind),
      # saved in the workdir
      tokenizer='',
      tokenizer_kind='wordpiece',  # of a newly trained vocabulary: 'wordpiece' or 'sentencepiece' (unigram)
      tokenizer_documents=1_000_000,  # a new vocabulary learns from the first this many training documents; 0: all
      vocab_size=8192 if small else 30522,  # size of a newly trained vocabulary
      seq_len=128,
      mask_prob=0.15,
      max_predictions=0,  # masked positions per sequence the MLM head runs on; 0: ceil(seq_len * mask_prob)
      eval_fraction=0.05,  # share of documents held out for evaluation
      whole_word_masking=False,  # mask all tokens of a word together (BERT's whole-word-masking models)
      worker_count=0,  # grain worker processes masking and batching; 0: in the training process
      # Every random choice about the data: the held-out documents (and so the vocabulary, trained on the
      # others), the example order and the masks. `seed` is the model's (initialisation, dropout), so runs of
      # several model seeds see the same vocabulary, batches and held-out set, and their losses compare.
      seed=0,
  ))

  # ELECTRA replaced-token detection (objective 'electra'): the generator is the discriminator scaled by
  # generator_fraction (hidden, heads and feed-forward widths) and shares its embeddings.
  c.electra = ml_collections.ConfigDict(dict(
      generator_fraction=0.25,
      generator_weight=1.0,
      discriminator_weight=50.0,
      temperature=1.0,  # of the generator's sampling distribution
  ))

  c.update(trainer_config(
      batch_size=32 if small else 256, num_train_steps=600 if small else 100_000,
      learning_rate=1e-3 if small else 1e-4, weight_decay=0.01, log_every=25, eval_every=250,
      checkpoint_every=250, keep_checkpoints=3))
  c.warmup_steps = 60 if small else 10_000
  c.eval_batches = 8  # held-out batches per evaluation
  return c


def trainer_config(**overrides) -> ml_collections.ConfigDict:
  """The fields the trainer (posjax/training/trainer.py) reads, shared by pretraining and fine-tuning configs,
  with their defaults, then `overrides`."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32  # global, across all devices
  c.num_train_steps = 1000
  c.learning_rate = 1e-4
  c.weight_decay = 0.0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-6
  c.grad_clip_norm = 1.0
  # Gradients accumulated over this many micro-batches of batch_size / grad_accum_steps rows per update
  # (the same update as one batch, in less activation memory).
  c.grad_accum_steps = 1
  # A NaN/Inf loss or gradient norm is never applied; 'stop' ends the run naming the step (the last good
  # checkpoint stays the latest), 'skip' drops that update, counts it (metric skipped_updates) and goes on.
  c.nonfinite = 'stop'

  c.log_every = 25
  # Weights & Biases: with a project set (and the wandb package installed) the logged metrics also go to W&B,
  # to the run named `name` (default: the workdir's name); a resumed run goes on in the same W&B run.
  c.wandb = ml_collections.ConfigDict(dict(project='', entity='', name=''))
  c.eval_every = 250  # 0: at the end only
  c.checkpoint_every = 250
  c.keep_checkpoints = 3

  # Device mesh: sizes of the axes (-1: all remaining devices) and the logical-to-mesh axis table.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = [
      ('batch', ('data', 'fsdp')),
      ('length', None),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('embed_out', None),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv', None),
      ('pos', None),
      ('type', None),
      ('norm', None),
      ('kernel', None),
      ('groups', None),
      ('classes', None),
      ('layers', None),  # the stacked-layers axis of model.scan_layers
  ]
  # Multi-host: jax.distributed.initialize (posjax/training/distributed.py). 'auto': when the coordinator is
  # set here or in the environment (JAX_COORDINATOR_ADDRESS, a multi-task SLURM step, Open MPI); 'on':
  # always (TPU pods: no arguments needed); 'off': never. Empty/negative fields: taken from the environment.
  c.distributed = ml_collections.ConfigDict(dict(
      initialize='auto', coordinator_address='', num_processes=0, process_id=-1))
  for k, v in overrides.items():
    c[k] = v
  return c


def parse_arg(arg: str | None, sizes, default_size: str):
  """'SIZE[,VARIANT]' -> (size, variant or None)."""
  from posjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  parts = [p.strip() for p in (arg or default_size).split(',')]
  size = parts[0] or default_size
  if size not in sizes:
    raise ConfigError(f'unknown model size {size!r} in config string {arg!r}; valid sizes: {", ".join(sizes)}')
  if len(parts) > 2:
    raise ConfigError(f'config string {arg!r} must be SIZE or SIZE,VARIANT')
  return size, (parts[1] if len(parts) == 2 else None)
