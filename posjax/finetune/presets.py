"""Fine-tuning configs: shared fields plus per-task presets in the style of ELECTRA's recipe (Clark et al.
2020, appendix): AdamW, learning rate 1e-4, layer-wise decay 0.8, 10% linear warmup then linear decay,
batch 32, sequence length 128, weight decay 0, 3 epochs (10 for the small RTE and STS-B).

ELECTRA tunes the learning rate per model size (3e-4 small, 1e-4 base, 5e-5 large) and the layer decay (0.8
base, 0.9 large); set them with --config.learning_rate and --config.layer_decay (1.0 turns decay off).
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


def finetune_config(task: str) -> ml_collections.ConfigDict:
  """The config of one task (`all`: every GLUE task, each with its own preset)."""
  if task != 'all':
    tasks_lib.get(task)  # an unknown name fails here, naming the valid ones
  epochs, max_len = PRESETS.get(task, (0, 128))
  c = defaults.trainer_config(num_train_steps=0, learning_rate=1e-4, weight_decay=0.0, log_every=50,
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
  c.layer_decay = 0.8  # layer-wise learning-rate decay; 1.0: off
  c.warmup_fraction = 0.1
  c.hidden_dropout = -1.0  # >= 0 overrides the pretrained model's dropout (hidden and attention)
  c.predict_test = True  # write GLUE submission files for the test sets that are present
  return c
