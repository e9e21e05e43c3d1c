"""Retrieval metrics over a score matrix: mAP@k and R@k (recall at k), both directions.

Definitions are torchmetrics' (``RetrievalMAP(top_k=k)``, ``RetrievalRecall(top_k=k)``; the parity test
checks them on the same scores): a query's AP@k is the mean, over the relevant items ranked within the top k,
of the precision at their rank (0 when none is); R@k is the fraction of the query's relevant items ranked within
the top k. Text→audio has one relevant clip per caption, so AP@10 is 1/rank (DCASE's mAP@10) and R@k a hit
rate; audio→text has each clip's captions (Clotho: 5) as relevant items. Ties are ranked by index.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def ranked_relevance(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """(queries, k) bool: whether the item at each of the top-k ranks of each query (row) is relevant."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(relevant, top, axis=1)


def average_precision_at(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """(queries,) AP@k."""
    hits = ranked_relevance(scores, relevant, k)
    found = np.cumsum(hits, axis=1)
    precision = found / np.arange(1, hits.shape[1] + 1)
    count = hits.sum(axis=1)
    return np.where(count > 0, (precision * hits).sum(axis=1) / np.maximum(count, 1), 0.0)


def recall_at(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """(queries,) R@k."""
    return ranked_relevance(scores, relevant, k).sum(axis=1) / np.maximum(relevant.sum(axis=1), 1)


def retrieval_metrics(similarity: np.ndarray, caption_owner: np.ndarray, ks=KS) -> dict[str, float]:
    """``similarity``: (captions, clips) scores; ``caption_owner[i]``: the clip of caption i. Returns
    ``t2a_mAP@10``, ``t2a_R@k``, ``a2t_mAP@10``, ``a2t_R@k`` for k in ``ks``."""
    similarity = np.asarray(similarity, np.float64)
    relevant = np.asarray(caption_owner)[:, None] == np.arange(similarity.shape[1])[None, :]
    metrics = {}
    for name, scores, rel in (("t2a", similarity, relevant), ("a2t", similarity.T, relevant.T)):
        metrics[f"{name}_mAP@10"] = float(average_precision_at(scores, rel, 10).mean())
        for k in ks:
            metrics[f"{name}_R@{k}"] = float(recall_at(scores, rel, k).mean())
    return metrics


def chance_t2a_map_at_10(num_clips: int) -> float:
    """Expected text→audio mAP@10 of a random ranking of ``num_clips`` clips (one relevant): Σ_{r≤10} 1/r / N."""
    return float(sum(1.0 / r for r in range(1, min(10, num_clips) + 1)) / num_clips)
