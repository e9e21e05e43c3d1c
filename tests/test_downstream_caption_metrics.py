"""BLEU-4, ROUGE-L and CIDEr-D equal the COCO caption evaluation's (pycocoevalcap) on the same tokenised captions."""

import numpy as np
import pytest

from convnext_audio_jax.data import captions
from convnext_audio_jax.downstream import caption_metrics

bleu_ref = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="the parity reference needs the [downstream] extra")
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402


def test_metrics_equal_pycocoevalcap():
    clips = captions.open_captions("demo-captions@eval", demo_clips=30, seed=5)
    rng = np.random.default_rng(0)
    # Candidates: another clip's caption (some share events), a clip's own caption cut short, a made-up sentence.
    candidates = []
    for i, refs in enumerate(clips.captions):
        choice = i % 3
        candidates.append(clips.captions[rng.integers(30)][0] if choice == 0 else
                          " ".join(refs[0].split()[: 2 + i % 4]) if choice == 1 else "A dog barks, then a buzz!")
    ours = caption_metrics.caption_metrics(candidates, clips.captions)
    gts = {i: [caption_metrics.tokenize(r) for r in refs] for i, refs in enumerate(clips.captions)}
    res = {i: [caption_metrics.tokenize(c)] for i, c in enumerate(candidates)}
    bleus, _ = bleu_ref.Bleu(4).compute_score(gts, res, verbose=0)
    assert ours["BLEU_4"] == pytest.approx(bleus[3], abs=1e-9)
    assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert ours["CIDEr_D"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    assert 0.05 < ours["BLEU_4"] < 0.9 and 0.1 < ours["CIDEr_D"] < 5
    perfect = caption_metrics.caption_metrics([refs[0] for refs in clips.captions], clips.captions)
    assert perfect["ROUGE_L"] == pytest.approx(1.0) and perfect["CIDEr_D"] > ours["CIDEr_D"]


def test_tokenize():
    assert caption_metrics.tokenize("A dog's bark,  then RAIN.") == "a dog's bark then rain"


def test_meteor_runs_where_java_is():
    import shutil

    if shutil.which("java") is None:
        assert caption_metrics.meteor(["a dog barks"], [["a dog barks"]]) is None
        pytest.skip("no Java runtime on the PATH (Debian: default-jre): METEOR is not computed here")
    values = caption_metrics.caption_metrics(["A dog barking.", "heavy rain"],
                                             [["a dog barks", "a dog is barking loudly"], ["rain falls on a roof", "it rains"]],
                                             with_meteor=True)
    assert values["METEOR"] == pytest.approx(0.2782, abs=1e-3)  # what METEOR 1.5 gives these captions
