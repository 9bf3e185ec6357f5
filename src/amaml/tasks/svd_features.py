"""Item features of collaborative filtering: a truncated SVD of the training users' ratings.

The centred ratings of the meta-training users fill a users x items matrix (missing = 0);
its leading right singular vectors, standardised over the items those users rated, are the
items' input features (:func:`item_features`). Meta-test ratings never enter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .ratings import Ratings

__all__ = ["EXACT_SVD_MAX", "N_COMPONENTS", "ItemFeatures", "item_features"]

#: Number of SVD item features (fewer when there are fewer items or training users).
N_COMPONENTS = 100
#: Above this size of the smaller matrix side the SVD is computed by randomised subspace
#: iteration instead of a full LAPACK SVD (MovieLens-1M: 3706 items, about 6000 users).
EXACT_SVD_MAX = 2000

# SeedSequence spawn key of the sketch; 0 to 3 are taken by synthetic.py and collaborative.py.
_SKETCH = 4

FloatArray = np.ndarray
IntArray = np.ndarray


def _fix_signs(v: FloatArray) -> FloatArray:
    """Make each column's largest-magnitude entry positive (SVD signs are arbitrary)."""
    pivot = v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])]
    return v * np.where(pivot < 0, -1.0, 1.0)


def _top_right_singular(
    rows: IntArray,
    cols: IntArray,
    values: FloatArray,
    shape: tuple[int, int],
    k: int,
    seed: int,
) -> tuple[FloatArray, FloatArray]:
    """Top-``k`` singular values and right singular vectors ``[n_cols, k]`` of a sparse matrix.

    The matrix has ``values`` at ``(rows, cols)`` and zeros elsewhere. When its smaller side
    is at most :data:`EXACT_SVD_MAX` the SVD is exact, from the eigendecomposition of the
    Gram matrix of that side (much faster than LAPACK's SVD on these shapes; singular values
    below ``1e-7`` of the largest lose accuracy, and :func:`item_features` treats them as
    zero). Otherwise randomised subspace iteration (Halko, Martinsson and Tropp 2011,
    Alg. 4.4) with 50 extra directions and 10 power iterations on sparse products, seeded
    by ``seed``, recovers the leading components (MovieLens-1M) in seconds.
    """
    n_rows, n_cols = shape
    if min(shape) <= EXACT_SVD_MAX:
        dense = torch.zeros(shape, dtype=torch.float64)
        dense[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.from_numpy(values)
        if n_rows <= n_cols:
            w, u = torch.linalg.eigh(dense @ dense.T)
            w, u = w.flip(0)[:k], u.flip(1)[:, :k]
            s = w.clamp_min(0).sqrt()
            v = (dense.T @ u) / torch.where(s > 0, s, 1.0)
        else:
            w, v = torch.linalg.eigh(dense.T @ dense)
            w, v = w.flip(0)[:k], v.flip(1)[:, :k]
            s = w.clamp_min(0).sqrt()
        return s.numpy(), v.numpy()
    idx = torch.from_numpy(np.stack([rows, cols]))
    vals = torch.from_numpy(values)
    mat = torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True).coalesce()
    mat_t = torch.sparse_coo_tensor(idx.flip(0), vals, (n_cols, n_rows), check_invariants=True)
    mat_t = mat_t.coalesce()
    width = min(k + 50, n_rows, n_cols)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n_cols, width, dtype=torch.float64, generator=gen)
    q, _ = torch.linalg.qr(torch.sparse.mm(mat, omega))
    for _ in range(10):
        z, _ = torch.linalg.qr(torch.sparse.mm(mat_t, q))
        q, _ = torch.linalg.qr(torch.sparse.mm(mat, z))
    _, s, vt = torch.linalg.svd(torch.sparse.mm(mat_t, q).T, full_matrices=False)
    return s[:k].numpy(), vt[:k].T.numpy()


@dataclass(frozen=True)
class ItemFeatures:
    """Item features from a truncated SVD (see :func:`item_features`).

    Attributes:
        features: ``[n_items, k]`` standardised features, the model inputs.
        mean: ``[k]`` mean of the raw right singular vectors over the training items.
        std: ``[k]`` their standard deviation (1 for a null component).
        singular_values: ``[k]`` leading singular values of the centred training matrix.
        null_components: How many components had a negligible singular value (set to 0).
        train_items: How many items the training users rated.
    """

    features: FloatArray
    mean: FloatArray
    std: FloatArray
    singular_values: FloatArray
    null_components: int
    train_items: int


def item_features(
    ratings: Ratings,
    train_users: IntArray,
    rating_mean: float,
    seed: int,
    n_components: int = N_COMPONENTS,
) -> ItemFeatures:
    """SVD item features from the ratings of ``train_users`` only.

    Args:
        ratings: All ratings.
        train_users: Dense indices of the users whose ratings may be used.
        rating_mean: Their mean rating (the centring).
        seed: Seeds the randomised SVD of large matrices.
        n_components: Requested number of features.

    Returns:
        Features ``[n_items, k]`` with ``k = min(n_components, n_items, len(train_users))``,
        standardised per feature over the items that training users rated. A component
        with a negligible singular value (rank deficiency) is set to 0.
    """
    row_of = np.full(ratings.n_users, -1, dtype=np.int64)
    row_of[train_users] = np.arange(train_users.shape[0])
    keep = row_of[ratings.users] >= 0
    shape = (int(train_users.shape[0]), ratings.n_items)
    k = min(n_components, *shape)
    sketch_seed = int(np.random.SeedSequence(seed, spawn_key=(_SKETCH,)).generate_state(1)[0])
    s, v = _top_right_singular(
        row_of[ratings.users[keep]],
        ratings.items[keep],
        ratings.values[keep] - rating_mean,
        shape,
        k,
        sketch_seed,
    )
    v = _fix_signs(v)
    rated = np.zeros(ratings.n_items, dtype=bool)
    rated[ratings.items[keep]] = True
    mean = v[rated].mean(axis=0)
    std = v[rated].std(axis=0)
    # Negligible singular values span noise, not data: those features are set to 0.
    scale = s[0] if s.size else 0.0
    null = (s <= scale * 1e-6) | (std <= 1e-12)
    std = np.where(null, 1.0, std)
    mean = np.where(null, 0.0, mean)
    feats = (v - mean) / std
    feats[:, null] = 0.0
    return ItemFeatures(feats, mean, std, s, int(null.sum()), int(rated.sum()))
