"""Fine-tuning configs: shared fields plus per-task presets in the style of ELECTRA's recipe (Clark et al.
2020, appendix): AdamW, 10% linear warmup then linear decay, batch 32, sequence length 128, weight decay 0,
3 epochs (10 for the small RTE and STS-B), and a learning rate and layer-wise decay that follow the
pretrained model's size (`scaled`).

ELECTRA tunes the learning rate per model size (3e-4 small: width 256; 1e-4 base: 768; 5e-5 large: 1024)
and the layer decay (0.8 small and base, 0.9 large: 12 and 24 layers). One setting for all sizes fails at
the ends: with base's 1e-4 and 0.8 a BERT-tiny (width 128, 2 layers) fine-tuned 500 steps on SST-2
predicts the majority class only, while 1e-3 without decay reaches 77-79% dev accuracy. The presets leave
both at 0 ("by the model"), which `scaled` resolves from the pretrained model's width and depth; set
--config.learning_rate / --config.layer_decay (1.0: off) to choose them yourself.
"""

from __future__ import annotations

import ml_collections

from posjax.finetune import tasks as tasks_lib
from posjax.training import defaults

# task -> (epochs, max sequence length)
PRESETS = {
    'cola': (3, 128), 'sst2': (3, 128), 'mrpc': (3, 128), 'stsb': (10, 128), 'qqp': (3, 128),
    'mnli': (3, 128), 'qnli': (3, 128), 'rte': (10, 128), 'wnli': (3, 128),
    'imdb': (3, 512),  # reviews average ~300 tokens; 512 is BERT's longest
}

# (widest model width, learning rate): ELECTRA's small/base/large rates, and 1e-3 for width <= 128 (measured:
# BERT-tiny on SST-2, README "Fine-tuning").
LEARNING_RATES = ((128, 1e-3), (256, 3e-4), (768, 1e-4), (None, 5e-5))
# (deepest encoder, layer decay): none for shallow models (every layer is next to the classifier), ELECTRA's
# 0.8 up to 12 layers and 0.9 beyond.
LAYER_DECAYS = ((4, 1.0), (12, 0.8), (None, 0.9))


def _by_size(table, size: int) -> float:
  return next(v for limit, v in table if limit is None or size <= limit)


def scaled(config, width: int, layers: int) -> tuple[float, float, str]:
  """(learning rate, layer decay, a line saying which were chosen here): config.learning_rate and
  config.layer_decay, each set from the model's width or depth where the config leaves it at 0."""
  lr = config.learning_rate or _by_size(LEARNING_RATES, width)
  decay = config.layer_decay or _by_size(LAYER_DECAYS, layers)
  chosen = [f'{k} {v:g}' for k, v, given in (('learning rate', lr, config.learning_rate),
                                              ('layer decay', decay, config.layer_decay)) if not given]
  return lr, decay, (f'{" and ".join(chosen)} for a model of width {width} and {layers} layers (by size: '
                     'posjax/finetune/presets.py)' if chosen else '')


def finetune_config(task: str) -> ml_collections.ConfigDict:
  """The config of one task (`all`: every GLUE task, each with its own preset)."""
  if task != 'all':
    tasks_lib.get(task)  # an unknown name fails here, naming the valid ones
  epochs, max_len = PRESETS.get(task, (0, 128))
  c = defaults.trainer_config(num_train_steps=0, weight_decay=0.0, log_every=50,
                              eval_every=0, checkpoint_every=1000, keep_checkpoints=2)
  c.task = task
  c.tasks = ','.join(tasks_lib.GLUE_ORDER)  # for task=all: which tasks to run
  c.init_from = ''  # posjax pretraining workdir or Hugging Face checkpoint directory
  c.tokenizer = ''  # override: tokenizer.json / vocab.txt / directory; default: the checkpoint's own
  c.data = ml_collections.ConfigDict(dict(
      source='tsv',  # 'tsv' (GLUE's files / IMDB JSON lines under data.dir) or 'tfds'
      dir='',  # tsv: GLUE's root (holding CoLA/, SST-2/, ...) or the task's own directory; tfds: data_dir
      max_train_examples=0,  # > 0: a seeded random subset of the training set (quick runs)
      seq_len=max_len,  # sequence length (longer inputs are truncated); for task=all, 0: each task's preset
      seed=0,  # the training subset and the example order; `seed` is the model's (classifier, dropout)
  ))
  c.num_epochs = float(epochs)  # for task=all, 0: each task's preset
  c.num_train_steps = 0  # > 0 overrides num_epochs
  c.learning_rate = 0.0  # 0: by the pretrained model's width (LEARNING_RATES)
  c.layer_decay = 0.0  # layer-wise learning-rate decay; 1.0: off; 0: by the model's depth (LAYER_DECAYS)
  c.warmup_fraction = 0.1
  c.hidden_dropout = -1.0  # >= 0 overrides the pretrained model's dropout (hidden and attention)
  c.predict_test = True  # write GLUE submission files for the test sets that are present
  return c
