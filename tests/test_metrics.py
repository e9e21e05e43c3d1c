"""compute_metrics against scikit-learn, the exclusion policy, d′ and input errors."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from convnext_audio_jax.evaluation.metrics import compute_metrics, d_prime_from_auc


def per_class_values(result, key):
    return np.array([entry[key] for entry in result["per_class"]], dtype=float)


def assert_matches_sklearn(targets, scores):
    result = compute_metrics(targets, scores)
    np.testing.assert_allclose(
        per_class_values(result, "AP"), average_precision_score(targets, scores, average=None), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        per_class_values(result, "AUC"), roc_auc_score(targets, scores, average=None), rtol=0, atol=1e-6
    )
    return result


def test_random_scores_match_sklearn():
    rng = np.random.default_rng(0)
    targets = rng.random((400, 30)) < 0.15
    targets[0] = True  # every class has a positive ...
    targets[1] = False  # ... and a negative
    scores = rng.random((400, 30)) + 0.5 * targets
    result = assert_matches_sklearn(targets, scores)
    assert result["excluded"]["count"] == 0
    assert result["num_evaluated_classes"] == 30
    assert result["mAP"] == pytest.approx(average_precision_score(targets, scores, average="macro"), abs=1e-9)
    assert result["AUC"] == pytest.approx(roc_auc_score(targets, scores, average="macro"), abs=1e-9)


@pytest.mark.parametrize("decimals", [0, 1, 2])
def test_heavily_tied_scores_match_sklearn(decimals):
    rng = np.random.default_rng(decimals)
    targets = rng.random((300, 25)) < 0.3
    targets[0], targets[1] = True, False
    scores = np.round(rng.random((300, 25)) + 0.3 * targets, decimals).astype(np.float32)
    assert_matches_sklearn(targets, scores)


def test_constant_scores_give_chance_auc_and_prevalence_ap():
    targets = np.array([[1], [0], [0], [1], [0]], dtype=bool)
    result = assert_matches_sklearn(targets, np.full((5, 1), 0.3))
    assert result["AUC"] == 0.5
    assert result["mAP"] == pytest.approx(2 / 5)


def test_integer_scores_and_float_targets_are_accepted():
    rng = np.random.default_rng(3)
    targets = (rng.random((200, 6)) < 0.4).astype(np.float32)
    targets[0], targets[1] = 1.0, 0.0
    assert_matches_sklearn(targets, rng.integers(0, 5, size=(200, 6)))


def test_single_positive():
    scores = np.array([0.9, 0.2, 0.5, 0.7, 0.1])[:, None]
    targets = np.array([0, 0, 1, 0, 0])[:, None]
    result = assert_matches_sklearn(targets, scores)
    # Ranked third of five: precision 1/3 at its threshold; 2 of the 4 negatives below it.
    assert result["mAP"] == pytest.approx(1 / 3)
    assert result["AUC"] == pytest.approx(2 / 4)


def test_classes_without_positive_or_negative_are_excluded_and_reported():
    rng = np.random.default_rng(1)
    targets = rng.random((100, 5)) < 0.3
    targets[0], targets[1] = True, False
    targets[:, 1] = False  # no positive
    targets[:, 3] = True  # no negative
    scores = rng.random((100, 5))
    names = ["speech", "music", "dog", "car", "rain"]
    result = compute_metrics(targets, scores, class_names=names)

    assert result["excluded"] == {
        "count": 2,
        "indices": [1, 3],
        "names": ["music", "car"],
        "reasons": ["no positive", "no negative"],
    }
    assert result["num_evaluated_classes"] == 3
    kept = [0, 2, 4]
    assert result["mAP"] == pytest.approx(np.mean(average_precision_score(targets[:, kept], scores[:, kept], average=None)))
    assert result["AUC"] == pytest.approx(np.mean(roc_auc_score(targets[:, kept], scores[:, kept], average=None)))
    for index in (1, 3):
        entry = result["per_class"][index]
        assert entry["AP"] is None and entry["AUC"] is None and entry["d_prime"] is None
    assert result["per_class"][1]["positives"] == 0
    assert result["per_class"][3]["negatives"] == 0
    assert [entry["name"] for entry in result["per_class"]] == names
    json.dumps(result, allow_nan=False)  # no NaN or inf anywhere


def test_no_scorable_class_is_an_error_not_a_nan():
    with pytest.raises(ValueError, match="no class can be scored"):
        compute_metrics(np.zeros((10, 3)), np.random.default_rng(0).random((10, 3)))


def test_d_prime_is_the_mean_of_per_class_values_not_of_the_mean_auc():
    rng = np.random.default_rng(2)
    targets = rng.random((2000, 2)) < 0.5
    scores = np.stack([rng.random(2000) + 0.1 * targets[:, 0], rng.random(2000) + 0.9 * targets[:, 1]], axis=1)
    result = compute_metrics(targets, scores)
    aucs = roc_auc_score(targets, scores, average=None)
    assert aucs[0] < 0.7 < 0.95 < aucs[1]  # distinct enough for the two definitions to differ
    mean_of_per_class = np.mean(np.sqrt(2) * norm.ppf(aucs))
    of_mean_auc = np.sqrt(2) * norm.ppf(np.mean(aucs))
    assert result["d_prime"] == pytest.approx(mean_of_per_class, abs=1e-9)
    assert abs(result["d_prime"] - of_mean_auc) > 0.1
    np.testing.assert_allclose(per_class_values(result, "d_prime"), np.sqrt(2) * norm.ppf(aucs), atol=1e-9)


def test_d_prime_at_auc_one_and_zero_is_clipped_by_half_a_pair():
    targets = np.array([[1, 1], [1, 1], [0, 0], [0, 0], [0, 0]], dtype=bool)
    perfect = np.array([0.9, 0.8, 0.3, 0.2, 0.1])
    scores = np.stack([perfect, -perfect], axis=1)  # class 0 ranked perfectly, class 1 perfectly wrong
    result = compute_metrics(targets, scores)
    assert per_class_values(result, "AUC").tolist() == [1.0, 0.0]
    half_pair = 0.5 / (2 * 3)
    expected = np.sqrt(2) * norm.ppf([1 - half_pair, half_pair])
    np.testing.assert_allclose(per_class_values(result, "d_prime"), expected, atol=1e-9)
    assert result["d_prime_clipped"] == {"count": 2, "indices": [0, 1]}
    assert math.isfinite(result["d_prime"])
    assert d_prime_from_auc(0.75, 2, 3) == (pytest.approx(np.sqrt(2) * norm.ppf(0.75)), False)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"targets \(10, 3\) and scores \(10, 4\)"):
        compute_metrics(np.zeros((10, 3)), np.zeros((10, 4)))


def test_one_dimensional_input_is_rejected():
    with pytest.raises(ValueError, match="2-D"):
        compute_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_scores_are_rejected(bad_value):
    scores = np.random.default_rng(0).random((8, 3))
    scores[5, 2] = bad_value
    with pytest.raises(ValueError, match="non-finite.*clip 5, class 2"):
        compute_metrics(np.eye(8, 3), scores)


@pytest.mark.parametrize("bad_value", [2, 0.5, -1])
def test_non_binary_targets_are_rejected(bad_value):
    targets = np.eye(8, 3)
    targets[4, 1] = bad_value
    with pytest.raises(ValueError, match="binary.*clip 4, class 1"):
        compute_metrics(targets, np.random.default_rng(0).random((8, 3)))


def test_wrong_number_of_class_names_is_rejected():
    with pytest.raises(ValueError, match="2 names for 3 classes"):
        compute_metrics(np.eye(8, 3), np.random.default_rng(0).random((8, 3)), class_names=["a", "b"])


def test_audioset_eval_size_runs_and_matches_sklearn_on_sampled_classes():
    rng = np.random.default_rng(5)
    targets = rng.random((20000, 527)) < 0.01
    scores = (rng.random((20000, 527)) + 0.2 * targets).astype(np.float32)
    result = compute_metrics(targets, scores)
    assert result["num_clips"] == 20000 and result["num_classes"] == 527
    sampled = [0, 100, 526]
    np.testing.assert_allclose(
        per_class_values(result, "AP")[sampled],
        average_precision_score(targets[:, sampled], scores[:, sampled], average=None),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        per_class_values(result, "AUC")[sampled],
        roc_auc_score(targets[:, sampled], scores[:, sampled], average=None),
        atol=1e-6,
    )


def test_module_imports_without_torch_or_sklearn():
    blocked = "import sys; sys.modules['torch'] = None; sys.modules['sklearn'] = None; "
    subprocess.run(
        [sys.executable, "-c", blocked + "import convnext_audio_jax.evaluation.metrics"], check=True, capture_output=True
    )
