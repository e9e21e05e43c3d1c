import math

import numpy as np
import pytest

from convnext_audio_jax.inference import windowing


@pytest.mark.parametrize("length", [3, 10, 11, 23, 57, 100])
@pytest.mark.parametrize("hop", [1, 3, 10, 25])
@pytest.mark.parametrize("block", [1, 4, 13, 200])
def test_streamed_windows_equal_the_windows_of_the_whole_array(length, hop, block):
    signal = np.random.default_rng(length * 100 + hop).standard_normal(length).astype(np.float32)
    starts = windowing.window_starts(length, 10, hop)
    streamed = list(windowing.stream_windows((signal[i : i + block] for i in range(0, length, block)), 10, hop))
    assert [start for start, _ in streamed] == starts.tolist()
    np.testing.assert_array_equal(np.stack([w for _, w in streamed]), windowing.cut_windows(signal, starts, 10))
    assert windowing.window_count(length, 10, hop) == len(starts)


def test_streaming_holds_one_window_and_one_block():
    """The buffer never grows with the stream: feed 10⁴ blocks and watch the largest window buffer."""
    sizes = []

    def blocks():
        for _ in range(10_000):
            yield np.ones(7, np.float32)

    for start, window in windowing.stream_windows(blocks(), 10, 3):
        sizes.append(window.size)
    assert set(sizes) == {10} and len(sizes) == windowing.window_count(70_000, 10, 3)


@pytest.mark.parametrize("hop", [0, -1.0, 1e-9, math.nan, math.inf, -math.inf])
def test_bad_hops_are_one_line_errors(hop):
    with pytest.raises(ValueError, match="--hop") as error:
        windowing.hop_samples(hop, 32_000)
    assert "\n" not in str(error.value)


def test_window_count_limit():
    windowing.check_window_count("a.wav", 32_000 * 3600, 320_000, 32_000, max_windows=3591)
    with pytest.raises(ValueError, match=r"a.wav: 3591 windows .* exceeds the limit of 3590"):
        windowing.check_window_count("a.wav", 32_000 * 3600, 320_000, 32_000, max_windows=3590)


def test_default_hop_is_half_the_models_window():
    """Without --hop, windows overlap by half whatever the model: 5 s for the released 10 s models (the former fixed
    default), 0.5 s for the 1 s demo, where a fixed 5 s would leave 4 s of every 5 unscored."""
    assert windowing.window_hop(None, 32_000, 320_000) == 160_000
    assert windowing.window_hop(None, 16_000, 16_000) == 8_000
    assert windowing.window_hop(0.25, 16_000, 16_000) == 4_000
    starts = windowing.window_starts(3 * 16_000, 16_000, windowing.window_hop(None, 16_000, 16_000))
    assert (starts / 16_000).tolist() == [0, 0.5, 1, 1.5, 2]
    with pytest.raises(ValueError, match="--hop"):
        windowing.window_hop(0.0, 16_000, 16_000)
