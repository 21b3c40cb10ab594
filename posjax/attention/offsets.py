"""Content-free score terms as tables over offsets.

A term that depends only on the positions of query i and key j, through d = j - i (key minus query), is one
value per head and offset: `table_HxR` over the R = 2L-1 offsets d = -(L-1)..L-1, column d + L - 1. TISA's
radial basis functions, T5's buckets, ALiBi's slopes and `convfixed`'s taps are such terms. Each registers its
table function on its `registry.Component` (`offsets`): `(model config, its parameters, L, H) -> table_HxR`;
its module evaluates that function on its own parameters. The shared computation adds the tables of a
variant's terms and then either spreads the sum over the LxL logits (`spread`, the XLA path) or hands it to
the fused kernel (`posjax.attention.flash`); `posjax.analysis` reads learned kernels from the same functions.
"""

from __future__ import annotations

import numpy as np


def distances(length: int) -> np.ndarray:
  """d_R = -(L-1)..L-1, the offsets a table's columns stand for."""
  return np.arange(-(length - 1), length)


def clipped_row(d, c: int, negate: bool = False):
  """The row of a (2c+1)-row table over offsets read at d = j - i (key minus query): clip(d, -c, c) + c, or
  clip(-d, -c, c) + c with `negate` for a table indexed by i - j (as `relative_key*` and `convk` index theirs);
  offsets beyond +-c read the edge rows."""
  return np.clip(-d if negate else d, -c, c) + c


def spread(table_HxR, length: int):
  """bias_1xHxLxL with bias[0, h, i, j] = table[h, j - i + L - 1], by reshapes (`relative.toeplitz`), not
  an LxL gather, whose gradient the TPU compiler lays out poorly."""
  from posjax.attention import relative  # pylint: disable=g-import-not-at-top
  return relative.toeplitz(table_HxR, length)[None]
