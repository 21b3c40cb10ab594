"""ELECTRA pretraining (Clark et al. 2020): a small MLM generator and a discriminator trained jointly on
replaced-token detection, sharing embeddings.

    python train.py --config=configs/electra.py:small --workdir=/tmp/electra

SIZE is one of SIZES (ELECTRA's small, base and large, plus `tiny`); VARIANT an attention variant (default
`absolute`).
"""

from posjax.training import defaults

# (layers, hidden, heads, feed-forward, embedding size)
SIZES = {
    'tiny': (2, 128, 2, 512, 64),
    'small': (12, 256, 4, 1024, 128),
    'base': (12, 768, 12, 3072, 768),
    'large': (24, 1024, 16, 4096, 1024),
}


def get_config(arg=None):
  size, variant = defaults.parse_arg(arg, SIZES, 'small')
  layers, hidden, heads, ffn, emb = SIZES[size]
  model = defaults.model_fields(
      hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ffn,
      embedding_size=emb if emb != hidden else 0, attention=variant or 'absolute')
  c = defaults.pretraining_config(model_type='electra', objective='electra', small=hidden <= 256, model=model)
  c.electra.generator_fraction = 1 / 3 if size == 'base' else 0.25
  return c
