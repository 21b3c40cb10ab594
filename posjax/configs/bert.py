"""BERT pretraining with masked language modelling (add next-sentence prediction with
`--config.objective=mlm+nsp`).

    python train.py --config=configs/bert.py:tiny --workdir=/tmp/bert
    python train.py --config=configs/bert.py:base,relative_key --workdir=DIR --config.num_train_steps=1000

The argument is `SIZE[,VARIANT]`: SIZE is one of SIZES (BERT's published shapes, Turc et al. 2019 for the
small ones) and VARIANT an attention variant (`python -m posjax.attention.table`), default `absolute`.
Shared fields are documented in posjax/training/defaults.py.
"""

from posjax.training import defaults

# (layers, hidden, heads); the feed-forward width is 4 * hidden as in BERT.
SIZES = {
    'tiny': (2, 128, 2),
    'mini': (4, 256, 4),
    'small': (4, 512, 8),
    'medium': (8, 512, 8),
    'base': (12, 768, 12),
    'large': (24, 1024, 16),
}


def get_config(arg=None):
  size, variant = defaults.parse_arg(arg, SIZES, 'tiny')
  layers, hidden, heads = SIZES[size]
  model = defaults.model_fields(hidden_size=hidden, num_layers=layers, num_heads=heads,
                                intermediate_size=4 * hidden, attention=variant or 'absolute')
  return defaults.pretraining_config(model_type='bert', objective='mlm', small=hidden <= 256, model=model)
