"""ALBERT pretraining (Lan et al. 2020): factorised embeddings, one layer shared by all, MLM + sentence-order
prediction. TISA (Wennberg & Henter 2021) was evaluated on ALBERT: `configs/albert.py:base,tisa`.

    python train.py --config=configs/albert.py:tiny,tisa --workdir=/tmp/albert

SIZE is one of SIZES (ALBERT's published shapes, plus `tiny` for quick runs); VARIANT an attention variant
(default `absolute`). ALBERT v2 trains without dropout and with the tanh GELU.
"""

from posjax.training import defaults

# (layers, hidden, heads, feed-forward, embedding size)
SIZES = {
    'tiny': (4, 128, 2, 512, 64),
    'base': (12, 768, 12, 3072, 128),
    'large': (24, 1024, 16, 4096, 128),
    'xlarge': (24, 2048, 16, 8192, 128),
    'xxlarge': (12, 4096, 64, 16384, 128),
}


def get_config(arg=None):
  size, variant = defaults.parse_arg(arg, SIZES, 'tiny')
  layers, hidden, heads, ffn, emb = SIZES[size]
  model = defaults.model_fields(
      hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ffn, embedding_size=emb,
      layer_groups=1, inner_group_size=1, hidden_act='gelu_new', hidden_dropout=0.0, attention_dropout=0.0,
      attention=variant or 'absolute')
  if variant and any(p in ('relative_key', 'relative_key_query') for p in variant.split('+')):
    model.attention_options.relative_scaled = False  # HF ALBERT adds relative terms after scaling
  config = defaults.pretraining_config(model_type='albert', objective='mlm+sop', small=hidden <= 256,
                                       model=model)
  config.data.tokenizer_kind = 'sentencepiece'  # ALBERT's unigram SentencePiece (`data.tokenizer`: a .model)
  return config
