"""How translation-invariant is a positional attention matrix? (Wennberg & Henter 2021, Sec. 3.)

Wennberg & Henter 2021 ("The Case for Translation-Invariant Self-Attention in Transformer-Based Language
Models", ACL) analyse, in their Sec. 3, two matrices built from a model's position embeddings P (n x D, the
first n positions) alone, with no token content and no softmax:

- the position embeddings' Gram matrix P P^T (how similar the embeddings of positions i and j are), and
- per layer l and head h, the positional attention  F_P^(l,h) = (P W_q^(l,h)) (P W_k^(l,h))^T / sqrt(Dh),
  the part of the attention logits that position alone contributes (their hat-F_P).

A matrix A is translation-invariant when A_ij depends on j - i only, i.e. when A is Toeplitz (their Eq. for
F_P, (F_P)_ij = f(j - i)). The degree to which it is, implemented here, is the fraction of A's variance that
its best Toeplitz approximation explains:

    T(A)_ij = mean{ A_kl : l - k = j - i }            (average along each diagonal: the least-squares, i.e.
                                                       Frobenius-closest, Toeplitz matrix)
    tau(A)  = 1 - ||A - T(A)||_F^2 / ||A - mean(A)||_F^2

tau is 1 exactly when A is Toeplitz and lies in [0, 1] (a constant matrix is Toeplitz, so T(A) is never
further from A than A's mean); an n x n matrix of independent noise scores about (2n - 2) / (n^2 - 1), the
share of degrees of freedom the 2n - 1 diagonal means absorb. tau is unchanged by scaling A or adding a
constant to it, so the 1/sqrt(Dh) and any global offset do not matter. The diagonal means, read as a
function of the offset d = j - i, are the matrix's effective kernel (`diagonal_means`).

Note on provenance: the paper reports this degree of translation invariance (it grows during training and
correlates with GLUE scores) but its text was not available to us in full when this was written; the formula
above is the variance-explained reading of "closeness to the best Toeplitz approximation", stated exactly so
numbers are reproducible. Everything here is NumPy, float64.
"""

from __future__ import annotations

import numpy as np


def _offsets(n: int, m: int) -> np.ndarray:
  """d_nxm[i, j] = j - i + (n - 1): the diagonal index of every entry, 0..n+m-2."""
  return np.arange(m)[None, :] - np.arange(n)[:, None] + (n - 1)


def diagonal_means(a_NxM) -> np.ndarray:
  """The mean of each diagonal of the last two axes, ordered by offset d = j - i from -(n-1) to m-1.

  `a` is ...xNxM (e.g. HxLxL for all heads); returns ...x(N+M-1). For a positional attention matrix this is
  its effective kernel k(d): what attending from position i to position i + d scores on average."""
  a = np.asarray(a_NxM, np.float64)
  n, m = a.shape[-2:]
  idx = _offsets(n, m).ravel()
  sums = np.zeros((n + m - 1,) + a.shape[:-2])
  np.add.at(sums, idx, np.moveaxis(a.reshape(*a.shape[:-2], n * m), -1, 0))
  return np.moveaxis(sums, 0, -1) / np.bincount(idx, minlength=n + m - 1)


def toeplitz_projection(a_NxM) -> np.ndarray:
  """T(A): every entry replaced by the mean of its diagonal (the Frobenius-closest Toeplitz matrix)."""
  a = np.asarray(a_NxM, np.float64)
  n, m = a.shape[-2:]
  return diagonal_means(a)[..., _offsets(n, m)]


def translation_invariance(a_NxM) -> np.ndarray:
  """tau(A) = 1 - ||A - T(A)||^2 / ||A - mean(A)||^2 over the last two axes (see the module docstring).

  Returns a scalar for one matrix, an array for a stack (e.g. H heads). A constant matrix (no variance) is
  perfectly translation-invariant: tau = 1."""
  a = np.asarray(a_NxM, np.float64)
  if a.ndim < 2:
    raise ValueError(f'translation_invariance needs a matrix (..., n, m); got shape {a.shape}')
  resid = ((a - toeplitz_projection(a)) ** 2).sum(axis=(-2, -1))
  total = ((a - a.mean(axis=(-2, -1), keepdims=True)) ** 2).sum(axis=(-2, -1))
  scale = np.maximum(np.abs(a).max(axis=(-2, -1)), 1e-300) ** 2 * a.shape[-1] * a.shape[-2]
  flat = total <= 1e-24 * scale  # no variance to explain
  tau = 1.0 - resid / np.where(flat, 1.0, total)
  return np.where(flat, 1.0, tau)
