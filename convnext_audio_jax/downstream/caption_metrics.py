"""Captioning metrics of the COCO caption evaluation (as DCASE and the paper report them): BLEU-4, ROUGE-L and
CIDEr-D, over captions tokenised by :func:`tokenize` (lower case, punctuation dropped, split on spaces).

Definitions follow the coco-caption code (``pycocoevalcap``; the parity test compares them on the same tokenised
captions): BLEU is corpus-level, its brevity penalty from each candidate's closest reference length; ROUGE-L is
the mean over clips of the LCS F-measure (beta 1.2) of the best precision and best recall over references;
CIDEr-D is the mean over clips of 10 × the mean over n = 1..4 and over references of the clipped tf-idf cosine
(document frequencies over the references of the evaluated clips), times a Gaussian length penalty (sigma 6) on
the difference of the two sentences' bigram counts, as that code counts length. METEOR 1.5 is a Java program:
:func:`meteor` runs the copy pycocoevalcap ships where a Java runtime is on the PATH (Debian: ``default-jre``) and
says None otherwise; SPICE (so SPIDEr) needs a Stanford CoreNLP download and is not computed.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = re.compile(r"[^\w\s']|_")


def tokenize(caption: str) -> str:
    """Lower case, punctuation removed, words joined by single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> float:
    """Corpus BLEU-n of tokenised ``candidates[i]`` against ``references[i]``."""
    guess, correct = [0] * n, [0] * n
    test_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        words = candidate.split()
        counts = _ngrams(words, n)
        best: Counter = Counter()
        lengths = []
        for ref in refs:
            ref_words = ref.split()
            lengths.append(len(ref_words))
            best |= _ngrams(ref_words, n)  # the largest count of each n-gram in any reference
        test_length += len(words)
        reference_length += min(lengths, key=lambda length: (abs(length - len(words)), length))
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(count, best[gram])
    score = 1.0
    for k in range(n):
        score *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
    score **= 1.0 / n
    ratio = (test_length + 1e-15) / (reference_length + 1e-9)
    return score * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    scores = []
    for candidate, refs in zip(candidates, references):
        words = candidate.split(" ")
        common = [(_lcs(ref.split(" "), words), len(ref.split(" "))) for ref in refs]
        precision = max(c / len(words) for c, _ in common)
        recall = max(c / length for c, length in common)
        scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision)
                      if precision and recall else 0.0)
    return sum(scores) / len(scores)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> float:
    document_frequency: Counter = Counter()
    cooked_refs = [[_ngrams(ref.split(), n) for ref in refs] for refs in references]
    for refs in cooked_refs:
        document_frequency.update({gram for counts in refs for gram in counts})
    log_clips = math.log(len(references))

    def vector(counts: Counter):
        vec: list[dict] = [{} for _ in range(n)]
        norms = [0.0] * n
        for gram, count in counts.items():
            weight = count * (log_clips - math.log(max(1.0, document_frequency[gram])))
            vec[len(gram) - 1][gram] = weight
            norms[len(gram) - 1] += weight * weight
        bigrams = sum(count for gram, count in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norms], bigrams

    scores = []
    for candidate, refs in zip(candidates, cooked_refs):
        vec, norm, length = vector(_ngrams(candidate.split(), n))
        total = 0.0
        for ref in refs:
            ref_vec, ref_norm, ref_length = vector(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for k in range(n):
                value = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] and ref_norm[k]:
                    value /= norm[k] * ref_norm[k]
                total += value * penalty
        scores.append(10.0 * total / n / len(refs))
    return sum(scores) / len(scores)


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """METEOR 1.5 (pycocoevalcap's jar, run by Java) of tokenised captions; None without Java or pycocoevalcap."""
    if shutil.which("java") is None:
        return None
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score({i: list(refs) for i, refs in enumerate(references)},
                                        {i: [candidate] for i, candidate in enumerate(candidates)})
    finally:
        scorer.meteor_p.kill()  # its own __del__ would wait on the process
        scorer.meteor_p.wait()
    return float(score)


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]],
                    with_meteor: bool = False) -> dict[str, float]:
    """``BLEU_4``, ``ROUGE_L`` and ``CIDEr_D`` (and ``METEOR`` when ``with_meteor`` and Java is here) of raw
    candidate captions (one per clip) against each clip's raw reference captions (both tokenised here)."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} clips")
    hypotheses = [tokenize(c) for c in candidates]
    refs = [[tokenize(r) for r in rs] for rs in references]
    values = {"BLEU_4": bleu(hypotheses, refs), "ROUGE_L": rouge_l(hypotheses, refs), "CIDEr_D": cider_d(hypotheses, refs)}
    score = meteor(hypotheses, refs) if with_meteor else None
    return values if score is None else {**values, "METEOR": score}
