"""ConvBERT pretraining (Jiang et al. 2020) with ELECTRA's replaced-token detection.

    python train.py --config=configs/convbert.py:small --workdir=/tmp/convbert
    python train.py --config=configs/convbert.py:small,none+convbert --workdir=...   # no position embeddings

SIZE is one of SIZES (the paper's small, medium-small and base, plus `tiny` for quick runs). VARIANT replaces
the attention (default `absolute+convbert`: learned positions and span-based convolution heads, head ratio 2,
kernel 9).
"""

from posjax.training import defaults

# (layers, hidden, heads, feed-forward, embedding size, feed-forward groups)
SIZES = {
    'tiny': (2, 128, 4, 512, 64, 1),
    'small': (12, 256, 4, 1024, 128, 1),
    'medium-small': (12, 384, 8, 1536, 128, 2),
    'base': (12, 768, 12, 3072, 768, 1),
}


def get_config(arg=None):
  size, variant = defaults.parse_arg(arg, SIZES, 'small')
  layers, hidden, heads, ffn, emb, groups = SIZES[size]
  model = defaults.model_fields(
      hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ffn,
      embedding_size=emb if emb != hidden else 0, ffn_groups=groups, attention=variant or 'absolute+convbert')
  model.attention_options.convbert_kernel_size = 9
  c = defaults.pretraining_config(model_type='convbert', objective='electra', small=hidden <= 256, model=model)
  c.electra.generator_fraction = 1 / 3 if size == 'base' else 0.25
  return c
