"""Exact cosine search over rows streamed in chunks: the k nearest rows of each query, near-duplicate pairs, and the
k-NN head's weighted votes (numpy only, so that a loaded head predicts without scikit-learn).

Rows are L2-normalised as they are read, so a dot product is the cosine similarity. Nothing holds more than one
gallery chunk (at most CHUNK_BYTES of float32 rows) and one block of scores (at most SCORE_CELLS similarities, with
their int64 positions while the best are picked) besides the answer, whatever the number of rows: memory is about
64 MiB + 12 x SCORE_CELLS bytes = 88 MiB, plus queries x k x 12 bytes for the answer (about 3 times that while a
block of QUERY_BLOCK queries is searched). The gallery is read once per QUERY_BLOCK queries. Duplicate pairs hold
two chunks. scikit-learn's brute-force NearestNeighbors needs the whole gallery in memory, and faiss or hnswlib
are not dependencies of featx, hence this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import FeatxError
from ..options import OptionError

CHUNK_BYTES = 64 << 20  # gallery rows read at a time (float32)
SCORE_CELLS = 2 << 20  # queries x gallery rows scored at a time
QUERY_BLOCK = 1024  # queries searched together in one pass over the gallery

Blocks = Callable[[], Iterable[tuple[int, np.ndarray]]]  # a fresh pass over (first row, float32 block) of the gallery


@dataclass
class Hits:
    """The answer of `top_k`: rows (queries, k) of gallery row indices and their cosine similarities, best first."""

    rows: np.ndarray
    scores: np.ndarray


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in place, with sklearn.preprocessing.normalize's steps (near-zero rows kept)."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    X /= norms[:, None]
    return X


def normalized(X: np.ndarray, copy: bool = True) -> np.ndarray:
    """Rows as float32, scaled to unit L2 norm (all-zero rows stay zero): a copy, or X itself when `copy` is False
    and X is float32 already."""
    return l2_normalize(np.array(X, dtype=np.float32, copy=copy or None))


def chunk_rows_for(width: int) -> int:
    """Gallery rows per chunk for rows of `width` float32 values: at most CHUNK_BYTES of them."""
    return max(1, CHUNK_BYTES // (4 * max(1, width)))


def array_blocks(X: np.ndarray, chunk_rows: int | None = None) -> Blocks:
    """A gallery held in memory (already normalised) as blocks of rows."""
    step = chunk_rows or chunk_rows_for(X.shape[1])
    return lambda: ((start, X[start : start + step]) for start in range(0, len(X), step))


def top_k(queries: np.ndarray, blocks: Blocks, n_rows: int, k: int, exclude: np.ndarray | None = None) -> Hits:
    """The `k` gallery rows most similar to each normalised query, by exact search over `blocks` (normalised rows).

    `exclude[i]` is a gallery row that query i may not return (its own row), or -1. k is at most n_rows (less one
    when rows are excluded); equal scores are listed lower row first. The gallery is read once per block of
    queries."""
    n_queries = len(queries)
    k = min(k, n_rows - (1 if exclude is not None and (exclude >= 0).any() else 0))
    if k < 1:
        return Hits(np.empty((n_queries, 0), dtype=np.int64), np.empty((n_queries, 0), dtype=np.float32))
    best_rows = np.empty((n_queries, k), dtype=np.int64)
    best_scores = np.empty((n_queries, k), dtype=np.float32)
    step = QUERY_BLOCK
    for q0 in range(0, n_queries, step):
        q1 = min(n_queries, q0 + step)
        skip = None if exclude is None else exclude[q0:q1]
        rows, scores = _search_block(queries[q0:q1], blocks(), k, skip)
        best_rows[q0:q1], best_scores[q0:q1] = rows, scores
    return Hits(best_rows, best_scores)


def _search_block(queries: np.ndarray, blocks: Iterable, k: int, exclude: np.ndarray | None):
    n = len(queries)
    rows = np.full((n, 0), -1, dtype=np.int64)
    scores = np.full((n, 0), -np.inf, dtype=np.float32)
    for start, block in blocks:
        for sub_start, sub in _sub_blocks(start, block, n):
            rows, scores = _merge(queries, sub_start, sub, k, exclude, rows, scores)
        del block, sub  # no reference to this chunk while the next one is read
    return _sorted(rows, scores)


def _merge(queries, start: int, sub: np.ndarray, k: int, exclude, rows, scores):
    """The best k of (rows, scores) and of the rows `sub` (starting at gallery row `start`)."""
    sims = queries @ sub.T
    if exclude is not None:
        inside = (exclude >= start) & (exclude < start + len(sub))
        sims[np.flatnonzero(inside), exclude[inside] - start] = -np.inf
    if sims.shape[1] > k:  # this sub-block's best k first: no copy of the scores
        pick = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        sub_rows, sims = pick + start, np.take_along_axis(sims, pick, axis=1)
    else:
        sub_rows = np.broadcast_to(np.arange(start, start + len(sub)), sims.shape)
    return _best(np.concatenate([rows, sub_rows], axis=1), np.concatenate([scores, sims], axis=1), k)


def _sub_blocks(start: int, block: np.ndarray, n_queries: int) -> Iterator[tuple[int, np.ndarray]]:
    """A gallery chunk cut so that queries x rows stays within SCORE_CELLS."""
    step = max(1, SCORE_CELLS // max(1, n_queries))
    for i in range(0, len(block), step):
        yield start + i, block[i : i + step]


def _best(rows: np.ndarray, scores: np.ndarray, k: int):
    """The k highest scores of each row of (at most 2k) candidates, in any order."""
    if scores.shape[1] <= k:
        return rows, scores
    pick = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(rows, pick, axis=1), np.take_along_axis(scores, pick, axis=1)


def _sorted(rows: np.ndarray, scores: np.ndarray):
    """Best first; equal scores by gallery row."""
    order = np.lexsort((rows, -scores), axis=1) if rows.size else np.empty(rows.shape, dtype=np.int64)
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def duplicate_pairs(blocks: Blocks, threshold: float, max_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (P, 2) of gallery rows i < j, their cosine similarities) with similarity >= threshold, best first.

    Every chunk is compared with itself and the chunks after it (the gallery is read about chunks / 2 times).
    More than `max_pairs` pairs is a FeatxError: the threshold is too low to mean duplicates."""
    found_pairs, found_scores, total = [], [], 0
    for start_a, block_a in blocks():
        for start_b, block_b in blocks():
            if start_b + len(block_b) <= start_a:
                continue
            for sub_start, sub in _sub_blocks(start_a, block_a, len(block_b)):
                sims = sub @ block_b.T
                i, j = np.nonzero(sims >= threshold)
                i, j = i + sub_start, j + start_b
                keep = i < j
                i, j = i[keep], j[keep]
                total += len(i)
                if total > max_pairs:
                    raise OptionError("{threshold=}: more than {max} pairs are that similar; raise the threshold "
                                      "(near-duplicates score about 0.95 and above) or {max_pairs}",
                                      threshold=threshold, max=max_pairs)
                found_pairs.append(np.stack([i, j], axis=1))
                found_scores.append(sims[i - sub_start, j - start_b])
    if not found_pairs:
        return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32)
    pairs, scores = np.concatenate(found_pairs), np.concatenate(found_scores)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -scores))
    return pairs[order], scores[order]


def knn_votes(X: np.ndarray, rows: np.ndarray, labels: np.ndarray, n_classes: int, n_neighbors: int,
              temperature: float) -> np.ndarray:
    """(len(X), n_classes) normalised votes of the `n_neighbors` training `rows` (normalised) nearest each row of X.

    k is at most the training rows. Weights are exp((cos - best cos) / T): the best neighbour's weight is 1, which
    changes no normalised vote and cannot overflow at a small T. Similarities are taken in float64: float32 BLAS
    products differ by batch size on some CPUs (AVX2), and a row's votes must not depend on the rows beside it."""
    hits = top_k(normalized(X).astype(np.float64), array_blocks(rows), len(rows), int(n_neighbors))
    weights = np.exp((hits.scores - hits.scores[:, :1]) / np.float32(temperature))
    votes = np.zeros((len(X), n_classes), dtype=np.float64)
    np.add.at(votes, (np.repeat(np.arange(len(X)), hits.rows.shape[1]), labels[hits.rows].ravel()), weights.ravel())
    return votes / votes.sum(axis=1, keepdims=True)
