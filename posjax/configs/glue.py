"""Fine-tuning on a GLUE task or IMDB from a posjax pretraining workdir or a Hugging Face checkpoint.

    python train.py --config=configs/glue.py:sst2 --config.init_from=PRETRAIN_DIR \
        --config.data.dir=GLUE_DIR --workdir=DIR
    python train.py --config=configs/glue.py:all --config.init_from=CKPT --config.data.dir=GLUE_DIR --workdir=DIR

The argument is a task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, imdb, or `all` (every GLUE task,
each in DIR/TASK, then the GLUE score). Fields and presets: posjax/finetune/presets.py.
"""

from posjax.finetune import presets


def get_config(arg='sst2'):
  return presets.finetune_config(arg.strip())
