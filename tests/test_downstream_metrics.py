"""Retrieval metrics equal torchmetrics' RetrievalMAP / RetrievalRecall on the same scores, both directions."""

import numpy as np
import pytest

from convnext_audio_jax.downstream import metrics

torch = pytest.importorskip("torch", reason="the parity reference needs the [test] extra (torch)")
tm = pytest.importorskip("torchmetrics.retrieval", reason="the parity reference needs the [test] extra (torchmetrics)")


def _reference(scores: np.ndarray, relevant: np.ndarray, metric) -> float:
    queries = np.repeat(np.arange(scores.shape[0]), scores.shape[1])
    return float(metric(torch.from_numpy(scores.ravel()), torch.from_numpy(relevant.ravel()),
                        indexes=torch.from_numpy(queries)))


def test_retrieval_metrics_equal_torchmetrics():
    rng = np.random.default_rng(0)
    clips, per_clip = 23, 5  # a2t: five relevant captions per clip, as Clotho; t2a: one relevant clip
    owner = np.repeat(np.arange(clips), per_clip)
    # Scores that rank the right clip anywhere from first to last: every metric away from 0 and 1.
    similarity = rng.normal(size=(clips * per_clip, clips)) + 1.5 * (owner[:, None] == np.arange(clips))
    ours = metrics.retrieval_metrics(similarity, owner)
    relevant = owner[:, None] == np.arange(clips)[None, :]
    for direction, scores, rel in (("t2a", similarity, relevant), ("a2t", similarity.T, relevant.T)):
        expected = _reference(scores, rel, tm.RetrievalMAP(top_k=10))
        assert ours[f"{direction}_mAP@10"] == pytest.approx(expected, abs=1e-6)
        for k in metrics.KS:
            expected = _reference(scores, rel, tm.RetrievalRecall(top_k=k))
            assert ours[f"{direction}_R@{k}"] == pytest.approx(expected, abs=1e-6), (direction, k)
    assert 0.1 < ours["t2a_mAP@10"] < 0.9 and 0.1 < ours["a2t_R@5"] < 0.9


def test_chance_map_is_the_mean_over_random_rankings():
    rng = np.random.default_rng(1)
    clips = 30
    owner = np.arange(clips).repeat(2)
    runs = [metrics.retrieval_metrics(rng.normal(size=(2 * clips, clips)), owner)["t2a_mAP@10"] for _ in range(400)]
    assert np.mean(runs) == pytest.approx(metrics.chance_t2a_map_at_10(clips), rel=0.05)
