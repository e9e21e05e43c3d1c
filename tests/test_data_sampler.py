import numpy as np
import pytest

from convnext_audio_jax.data.sampler import BalancedIndices


def skewed_dataset() -> np.ndarray:
    """Class 0: 400 clips, class 1: 40, class 2: 4, class 3: none, class 4: 1 clip also labelled 0."""
    targets = np.zeros((445, 5), dtype=bool)
    targets[:400, 0] = True
    targets[400:440, 1] = True
    targets[440:444, 2] = True
    targets[444, [0, 4]] = True
    return targets


def test_every_class_is_drawn_equally_often_on_a_skewed_dataset():
    targets = skewed_dataset()
    sampler = BalancedIndices(targets, seed=3)
    np.testing.assert_array_equal(sampler.sampled_classes, [0, 1, 2, 4])
    draws = 4 * 250
    clips = np.array([sampler[i] for i in range(draws)])
    classes = np.array([sampler.class_of_draw(i) for i in range(draws)])
    # Each draw takes a clip of the class it popped from the queue.
    assert targets[clips, classes].all()
    np.testing.assert_array_equal(np.bincount(classes, minlength=5), [250, 250, 250, 0, 250])
    # Clip-level label frequency is near-uniform over the sampled classes, unlike the dataset's 400:40:4:1.
    label_frequency = targets[clips].sum(axis=0)
    assert label_frequency[1] == 250 and label_frequency[2] == 250
    assert 250 <= label_frequency[0] <= 500  # class-4 draws also carry label 0
    # Shuffling within a class: in the first 250 draws of class 0, the 400 clips are not taken in order.
    class_0_clips = clips[classes == 0]
    assert len(set(class_0_clips.tolist())) == 250 and not np.all(np.diff(class_0_clips) > 0)


def test_each_class_cycles_through_all_its_clips_before_repeating():
    targets = skewed_dataset()
    sampler = BalancedIndices(targets, seed=0)
    draws = 4 * 40 * 2  # two full cycles of class 1's 40 clips
    clips = np.array([sampler[i] for i in range(draws)])
    classes = np.array([sampler.class_of_draw(i) for i in range(draws)])
    class_1 = clips[classes == 1]
    assert sorted(class_1[:40].tolist()) == list(range(400, 440))
    assert sorted(class_1[40:].tolist()) == list(range(400, 440))
    assert not np.array_equal(class_1[:40], class_1[40:])  # reshuffled for the next cycle
    class_2 = clips[classes == 2]
    for cycle in range(len(class_2) // 4):
        assert sorted(class_2[4 * cycle : 4 * cycle + 4].tolist()) == [440, 441, 442, 443]


def test_same_seed_same_sequence_and_random_access_matches_sequential():
    targets = skewed_dataset()
    first = [BalancedIndices(targets, seed=7)[i] for i in range(500)]
    again = BalancedIndices(targets, seed=7)
    assert [again[i] for i in range(500)] == first
    # Random access in any order (how a resumed iterator or a worker slice reads it) gives the same draws.
    fresh = BalancedIndices(targets, seed=7)
    positions = np.random.default_rng(0).permutation(500)
    assert [fresh[int(p)] for p in positions] == [first[p] for p in positions]
    other = [BalancedIndices(targets, seed=8)[i] for i in range(500)]
    assert other != first


def test_no_labelled_clip_is_an_error():
    with pytest.raises(ValueError, match="no class has a clip"):
        BalancedIndices(np.zeros((10, 3), bool), seed=0)
    with pytest.raises(ValueError, match=r"\(N, C\) matrix"):
        BalancedIndices(np.zeros(10, bool), seed=0)
