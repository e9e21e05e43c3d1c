import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import soxr

from convnext_audio_jax.data import audio
from data_helpers import tone


def dominant_frequency(clip: np.ndarray, sample_rate: int = audio.SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(clip.astype(np.float64)))
    return float(np.argmax(spectrum) * sample_rate / clip.size)


def test_stereo_44k_is_downmixed_resampled_and_padded(tmp_path):
    left = tone(3.0, 44_100, 1000.0)[:, 0]
    stereo = np.stack([left, left * 0.5], axis=1)
    path = tmp_path / "a.wav"
    soundfile.write(path, stereo, 44_100, subtype="FLOAT")
    clip = audio.load_clip(path)
    assert clip.dtype == np.int16 and clip.shape == (audio.CLIP_SAMPLES,)
    voiced = clip[: 3 * audio.SAMPLE_RATE - 100]
    assert dominant_frequency(voiced) == pytest.approx(1000.0, abs=1.0)
    # mean of the channels: amplitude 0.5 · 0.75
    assert np.abs(voiced).max() / audio.INT16_SCALE == pytest.approx(0.375, abs=0.01)
    assert not clip[3 * audio.SAMPLE_RATE + 100 :].any()  # zero padding after 3 s


def test_long_clip_keeps_the_first_ten_seconds(tmp_path):
    signal = np.concatenate([tone(10.0, 32_000, 440.0), tone(2.0, 32_000, 3000.0)])
    path = tmp_path / "long.flac"
    soundfile.write(path, signal, 32_000)
    clip = audio.load_clip(path)
    assert dominant_frequency(clip) == pytest.approx(440.0, abs=0.5)
    reference = audio.to_int16(signal[: audio.CLIP_SAMPLES, 0])
    assert np.abs(clip.astype(int) - reference).max() <= 1  # FLAC 16-bit quantisation only


def test_int16_conversion_clips_like_panns():
    np.testing.assert_array_equal(audio.to_int16(np.array([-2.0, -1.0, 0.5, 1.0, 3.0])),
                                  [-32767, -32767, 16383, 32767, 32767])
    assert audio.int16_to_float(np.array([32767], dtype=np.int16))[0] == 1.0


@pytest.mark.parametrize("case, reason", [
    ("missing", audio.MISSING),
    ("garbage", audio.UNREADABLE),
    ("no_frames", audio.EMPTY),
    ("silent", audio.EMPTY),
    ("nan", audio.NON_FINITE),
    ("short", audio.TOO_SHORT),
])
def test_unusable_clips_fail_with_a_reason(tmp_path, case, reason):
    path = tmp_path / f"{case}.wav"
    if case == "garbage":
        path.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    elif case == "no_frames":
        soundfile.write(path, np.zeros((0, 1), np.float32), 16_000)
    elif case == "silent":
        soundfile.write(path, np.zeros(48_000, np.float32), 16_000)
    elif case == "nan":
        signal = tone(2.0, 16_000, 300.0)
        signal[100] = np.nan
        soundfile.write(path, signal, 16_000, subtype="FLOAT")  # PCM_16 would turn NaN into a number
    elif case == "short":
        soundfile.write(path, tone(0.2, 16_000, 300.0), 16_000)
    with pytest.raises(audio.ClipError) as error:
        audio.load_clip(path, clip_id=f"id-{case}")
    assert error.value.reason == reason
    assert error.value.clip_id == f"id-{case}"


def test_min_seconds_is_configurable(tmp_path):
    path = tmp_path / "short.wav"
    soundfile.write(path, tone(0.2, 16_000, 300.0), 16_000)
    assert audio.load_clip(path, min_seconds=0.1).any()


def test_freedesktop_ogg_recordings_decode(freedesktop_recordings):
    for path in freedesktop_recordings[:5]:
        clip = audio.load_clip(path, min_seconds=0.05)
        assert clip.shape == (audio.CLIP_SAMPLES,) and clip.dtype == np.int16
        assert np.abs(clip).max() > 100, f"{path.name} decoded to near silence"


def test_espeak_speech_at_22k_is_resampled(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng; .ci/run does)")
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "front left, rear right"], check=True, capture_output=True)
    info = soundfile.info(path)
    clip = audio.load_clip(path, min_seconds=0.5)
    expected_samples = int(info.frames / info.samplerate * audio.SAMPLE_RATE)
    assert np.abs(clip[: expected_samples - 2000]).max() > 1000
    assert not clip[expected_samples + 200 :].any()


def test_sox_made_long_ogg_is_cropped(tmp_path):
    if shutil.which("sox") is None:
        pytest.fail("sox is not installed (apt-get install sox; .ci/run does)")
    path = tmp_path / "chirp.ogg"
    subprocess.run(["sox", "-n", "-r", "48000", "-c", "2", str(path), "synth", "25", "sine", "300:3000"],
                   check=True, capture_output=True)
    clip = audio.load_clip(path)
    assert clip.shape == (audio.CLIP_SAMPLES,)
    # The first 10 s of a 25 s linear chirp, 300 Hz + 108 Hz/s: a short window at each end pins both the
    # crop's start and its end (over a whole second the sweep covers 108 Hz and the peak could be anywhere).
    window = 4096  # 0.128 s: the sweep moves 14 Hz, the bins are 7.8 Hz wide
    assert dominant_frequency(clip[:window]) == pytest.approx(300.0 + 108.0 * 0.064, abs=16.0)
    assert dominant_frequency(clip[-window:]) == pytest.approx(1380.0 - 108.0 * 0.064, abs=16.0)


# ------------------------------------------------------------------------------------- streaming and spans

def test_stream_equals_decoding_the_whole_file(tmp_path):
    rng = np.random.default_rng(0)
    stereo = (0.3 * rng.standard_normal((100_003, 3))).astype(np.float32)
    path = tmp_path / "three.flac"
    soundfile.write(path, stereo, 44_100, subtype="PCM_24")
    samples, rate = audio.decode(path)
    whole = audio.to_mono(samples, rate, min_seconds=0.0)
    info, blocks = audio.stream_mono(path, block_frames=4_096)
    streamed = np.concatenate(list(blocks))
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
    assert (info.sample_rate, info.channels, info.frames_read, info.clipped) == (44_100, 3, 100_003, 0)



@pytest.mark.parametrize("target_rate", [16_000, 44_100])
def test_stream_resamples_to_the_target_rate(tmp_path, target_rate):
    """A model's own rate (the demo's 16 kHz): the streamed blocks equal soxr's one-shot resampling of the mono
    file, and the rate equal to the file's leaves the samples untouched."""
    rng = np.random.default_rng(1)
    stereo = np.clip(0.2 * rng.standard_normal((100_003, 2)), -0.9, 0.9).astype(np.float32)  # nothing clipped
    path = tmp_path / "two.wav"
    soundfile.write(path, stereo, 44_100, subtype="FLOAT")
    info, blocks = audio.stream_mono(path, block_frames=4_096, target_rate=target_rate)
    streamed = np.concatenate(list(blocks))
    mono = stereo.mean(axis=1, dtype=np.float32)
    expected = mono if target_rate == 44_100 else soxr.resample(mono, 44_100, target_rate, quality="HQ")
    assert streamed.shape == expected.shape
    np.testing.assert_allclose(streamed, expected, atol=1e-5)
    assert info.frames_read == 100_003
    for bad in (0, -16_000, 16_000.5, True):
        with pytest.raises(ValueError, match="target_rate must be a positive whole number of Hz"):
            audio.stream_mono(path, target_rate=bad)


def test_read_span_reads_only_its_span(tmp_path):
    signal = tone(30.0, 16_000, 440.0)
    path = tmp_path / "long.wav"
    soundfile.write(path, signal, 16_000, subtype="FLOAT")
    span, rate = audio.read_span(path, 12.5, 2.0)
    assert rate == 16_000
    np.testing.assert_array_equal(span, signal[200_000:232_000])
    # A file cut off mid-copy (its header declares more): every read is refused, naming the file.
    data = path.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) - 10 * 16_000 * 4])
    for read in (audio.load_clip, audio.stream_mono):
        with pytest.raises(audio.ClipError) as error:
            read(cut)
        assert error.value.reason == audio.TRUNCATED and str(cut) in str(error.value)


def _wav_with_data_size(path, size):
    data = bytearray(path.read_bytes())
    at = data.find(b"data")
    data[at + 4 : at + 8] = int(size).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_a_header_claiming_2_31_frames_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "liar.wav"
    soundfile.write(path, tone(1.0, 16_000, 440.0), 16_000, subtype="PCM_U8")  # 1 byte per frame: 2^31 frames fit the field
    _wav_with_data_size(path, 2**31)
    for read in (audio.load_clip, audio.decode, audio.stream_mono):
        with pytest.raises(audio.ClipError) as error:
            read(path)
        assert error.value.reason == audio.TRUNCATED
        assert str(path) in str(error.value) and "2147483648" in str(error.value)


def test_a_file_changed_while_read_is_an_error(tmp_path):
    path = tmp_path / "growing.wav"
    soundfile.write(path, tone(5.0, 16_000, 440.0), 16_000)
    info, blocks = audio.stream_mono(path, block_frames=1_000)
    next(blocks)
    with open(path, "ab") as file:  # e.g. a recorder still writing it
        file.write(b"\0" * 100)
    with pytest.raises(audio.ClipError) as error:
        list(blocks)
    assert error.value.reason == audio.CHANGED and str(path) in str(error.value)


def test_huge_finite_samples_are_clipped_and_counted(tmp_path):
    signal = tone(2.0, 16_000, 440.0, channels=2)
    signal[1000:1010] = 1e20
    signal[2000:2003, 1] = -3e38  # the mean of two such channels would overflow to -inf without the clip
    signal[2000:2003, 0] = -3e38
    path = tmp_path / "loud.wav"
    soundfile.write(path, signal, 16_000, subtype="FLOAT")
    info, blocks = audio.stream_mono(path)
    mono = np.concatenate(list(blocks))
    # Clipped to [-1, 1] before the downmix; resampling the resulting steps overshoots (Gibbs), boundedly.
    assert np.isfinite(mono).all() and np.abs(mono).max() < 1.5
    assert info.clipped == 26


def test_silence_streams_but_an_empty_file_does_not(tmp_path):
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(16_000, np.float32), 16_000)
    info, blocks = audio.stream_mono(silent)
    assert not np.concatenate(list(blocks)).any() and info.frames_read == 16_000
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros((0, 1), np.float32), 16_000)
    info, blocks = audio.stream_mono(empty)
    with pytest.raises(audio.ClipError) as error:
        list(blocks)
    assert error.value.reason == audio.EMPTY and str(empty) in str(error.value)


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".m4a"])
def test_a_zero_byte_file_is_empty_not_unreadable(tmp_path, suffix):
    path = tmp_path / f"nothing{suffix}"
    path.write_bytes(b"")
    for read in (lambda: audio.read_span(path), lambda: audio.stream_mono(path)):
        with pytest.raises(audio.ClipError) as error:
            read()
        assert (error.value.reason, error.value.detail) == ("empty", "the file has 0 bytes")
