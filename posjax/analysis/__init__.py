"""Analysis of position mechanisms: translation invariance (Wennberg & Henter 2021), learned positional
kernels per layer and head, attention maps, and figures; `python -m posjax.analysis` writes them as PNG.

    from posjax import analysis
    ck = analysis.load('runs/tiny')                 # a posjax workdir or a Hugging Face checkpoint dir
    pa = analysis.positional_attention(ck.config, ck.params, 64)   # per layer: HxLxL
    analysis.translation_invariance(pa[0])          # per head, 1.0 = exactly Toeplitz
"""

from posjax.analysis.sentence import attention_maps, tokenize
from posjax.analysis.invariance import diagonal_means, toeplitz_projection, translation_invariance
from posjax.analysis.positional import (Kernel, Table, attention_kernels, embedding_positional_attention,
                                       kernels, position_embeddings, positional_attention, relative_tables)
from posjax.analysis.report import analyze, summary
from posjax.pretrained import Pretrained as Checkpoint


def load(path: str, step: int | None = None) -> Checkpoint:
  """A posjax workdir (its latest verified checkpoint, or `step`'s) or a Hugging Face checkpoint directory;
  the tokenizer is read when there is one."""
  from posjax import pretrained  # pylint: disable=g-import-not-at-top
  return pretrained.load(path, step=step, need_tokenizer=False, what='checkpoint')


__all__ = [
    'attention_maps', 'tokenize', 'diagonal_means', 'toeplitz_projection', 'translation_invariance', 'Kernel',
    'attention_kernels', 'embedding_positional_attention', 'kernels', 'position_embeddings',
    'positional_attention', 'Table', 'relative_tables', 'Checkpoint', 'load', 'analyze', 'summary',
]
