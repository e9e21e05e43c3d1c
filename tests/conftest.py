"""Test set-up: eight simulated CPU devices so every sharding path runs, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA compilation cache for the whole run, in a folder of its own: the test processes (pytest-xdist's
# workers inherit this environment) and every single-process subprocess they start (train.py, the CLI) load a program
# another already compiled instead of compiling it again: the demo model, the tiny configs and the full-size models
# recur across files. Every program is stored (min compile time 0): most of the suite's are small. A cache the caller
# set is used as it is and kept; the one made here is removed when the run ends.
OWN_XLA_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    OWN_XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="convnext-audio-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile  # noqa: E402

FREEDESKTOP_SOUNDS = pathlib.Path("/usr/share/sounds/freedesktop/stereo")


def pytest_configure(config):
    """Builds the native CPU kernels before any test traces one (a jit trace does not build them; concurrent test
    processes build them once); without a compiler the native proofs fail on Linux (tests/native_marks.py) and skip
    elsewhere, and the fall-back tests test the fall-back."""
    from convnext_audio_jax import native

    native.available()


def pytest_unconfigure(config):
    """The run's XLA cache goes with the process that made it (pytest-xdist's workers and subprocesses only
    inherit its name)."""
    if OWN_XLA_CACHE:
        shutil.rmtree(OWN_XLA_CACHE, ignore_errors=True)


# The files that take longest, longest first (--durations on the 2-core CPU): pytest-xdist hands whole files to its
# two processes in collection order (pyproject.toml turns its own reorder off), so these start first and the short
# files fill in behind them, and both processes finish together instead of one starting a long file at the end.
# test_training_distill goes first because it trains the session's demo run (its teacher, which
# test_training_loop's last test reads later from the other process without waiting for it).
LONGEST_FILES_FIRST = (
    "test_training_distill.py",
    "test_export.py",
    "test_training_multiprocess.py",
    "test_training_loop.py",
    "test_end_to_end.py",
    "test_native_sanitizer.py",
    "test_convert.py",
    "test_pretrained.py",
)


def pytest_collection_modifyitems(config, items):
    """LONGEST_FILES_FIRST first, every other file after them in the order collected (the sort is stable)."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# Stand-ins for the Debian recordings, under some of their names, with their kinds of rates, channel counts and
# lengths: (name, sample rate, channels, seconds, sound).
SYNTHETIC_RECORDINGS = [
    ("alarm-clock-elapsed.oga", 48_000, 2, 3.0, "beeps"),
    ("audio-channel-front-center.oga", 48_000, 1, 1.2, "voice"),
    ("audio-channel-front-left.oga", 48_000, 2, 1.0, "voice"),
    ("audio-channel-front-right.oga", 48_000, 2, 1.0, "voice"),
    ("audio-channel-rear-center.oga", 44_100, 1, 1.3, "voice"),
    ("audio-channel-rear-left.oga", 44_100, 2, 1.1, "voice"),
    ("audio-channel-rear-right.oga", 44_100, 2, 1.1, "voice"),
    ("audio-channel-side-left.oga", 48_000, 2, 1.0, "voice"),
    ("audio-channel-side-right.oga", 48_000, 2, 1.0, "voice"),
    ("audio-test-signal.oga", 48_000, 1, 2.0, "pink"),
    ("bell.oga", 44_100, 2, 2.5, "bell"),
    ("camera-shutter.oga", 44_100, 2, 0.4, "clicks"),
    ("complete.oga", 44_100, 1, 1.0, "chirp"),
    ("phone-outgoing-busy.oga", 8_000, 1, 4.0, "busy"),
    ("window-attention.oga", 44_100, 2, 0.8, "chirp"),
]


def synthetic_sound(kind: str, rate: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A mono signal in [-0.5, 0.5] of one of the SYNTHETIC_RECORDINGS kinds."""
    t = np.arange(int(rate * seconds)) / rate
    if kind == "beeps":  # 880/1320 Hz pairs, 0.15 s on, 0.1 s off
        gate = (t % 0.25) < 0.15
        signal = gate * (np.sin(2 * np.pi * 880 * t) + 0.5 * np.sin(2 * np.pi * 1320 * t))
    elif kind == "voice":  # a 110-180 Hz harmonic series with vibrato, shaped by two formants, syllables at 4 Hz
        f0 = rng.uniform(110, 180) * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        formants = rng.uniform([500, 1400], [800, 2200])
        signal = sum(np.sin(k * phase) * (0.1 + sum(np.exp(-((k * f0 - f) / 200) ** 2) for f in formants)) / np.sqrt(k)
                     for k in range(1, int(min(8000, rate / 2.2) / f0.max())))
        signal = signal * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2)
    elif kind == "pink":  # 1/f noise from white noise shaped in the frequency domain
        spectrum = np.fft.rfft(rng.standard_normal(t.size))
        spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(t.size, 1 / rate), 20.0))
        signal = np.fft.irfft(spectrum, t.size)
    elif kind == "bell":  # inharmonic partials, each decaying at its own rate
        partials = [(523.0, 1.0, 1.5), (1046.0 * 1.02, 0.6, 2.5), (1568.0 * 1.05, 0.4, 4.0), (2794.0, 0.25, 6.0)]
        signal = sum(a * np.exp(-d * t) * np.sin(2 * np.pi * f * t) for f, a, d in partials)
    elif kind == "clicks":  # two noise bursts with fast decays
        signal = rng.standard_normal(t.size) * (np.exp(-60 * t) + np.exp(-60 * np.abs(t - 0.2)) * (t >= 0.2))
    elif kind == "chirp":  # exponential sweep 300 Hz -> 6 kHz with a fade in and out
        f0, f1 = 300.0, min(6000.0, rate / 2.5)
        k = np.log(f1 / f0) / seconds
        signal = np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k) * np.sin(np.pi * t / seconds)
    elif kind == "busy":  # the North American busy tone: 480 + 620 Hz, 0.5 s on, 0.5 s off
        signal = ((t % 1.0) < 0.5) * (np.sin(2 * np.pi * 480 * t) + np.sin(2 * np.pi * 620 * t))
    else:
        raise ValueError(f"unknown synthetic sound {kind!r}")
    # A room-noise floor about 30 dB below the peak, as a recording has: it keeps the spectrum (the mel bins
    # the parity tests compare) populated between a tone's partials.
    signal = signal / np.abs(signal).max() + 0.03 * rng.standard_normal(t.size)
    return (0.5 * signal / np.abs(signal).max()).astype(np.float32)


def write_synthetic_recordings(folder: pathlib.Path) -> list[pathlib.Path]:
    """SYNTHETIC_RECORDINGS as Ogg Vorbis files in ``folder`` (stereo ones pan the sound, as the channel tests do)."""
    paths = []
    for index, (name, rate, channels, seconds, kind) in enumerate(SYNTHETIC_RECORDINGS):
        rng = np.random.default_rng(index)
        mono = synthetic_sound(kind, rate, seconds, rng)
        if channels == 2:
            pan = 0.9 if "left" in name else 0.1 if "right" in name else 0.5
            samples = np.stack([pan * mono, (1 - pan) * mono], axis=1) * 1.6
        else:
            samples = mono[:, None]
        path = folder / name
        soundfile.write(path, samples, rate, format="OGG", subtype="VORBIS")
        paths.append(path)
    return sorted(paths)


@pytest.fixture(scope="session")
def freedesktop_recordings(tmp_path_factory) -> list[pathlib.Path]:
    """The real Ogg recordings of Debian's sound-theme-freedesktop (installed by .ci/run); where that package is
    missing, synthetic recordings written by the test (named like some of them, with the same kinds of rates,
    channel counts and lengths), with a warning, so that no test that needs recordings is skipped.
    TEST_RECORDINGS=synthetic uses the synthetic ones even where the package is installed."""
    files = sorted(FREEDESKTOP_SOUNDS.glob("*.oga"))
    if files and os.environ.get("TEST_RECORDINGS") != "synthetic":
        return files
    reason = ("TEST_RECORDINGS=synthetic" if files
              else f"sound-theme-freedesktop is not installed ({FREEDESKTOP_SOUNDS} has no .oga files)")
    synthetic = write_synthetic_recordings(tmp_path_factory.mktemp("synthetic_recordings"))
    warnings.warn(f"{reason}: using {len(synthetic)} synthetic recordings written by tests/conftest.py instead of "
                  f"Debian's (apt-get install sound-theme-freedesktop)")
    return synthetic


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """configs/demo.py trained once per session as the README ships it: the demo test checks its validation mAP and
    the distillation experiment uses it as its teacher. {"workdir", "result" (train's return), "seconds"}.

    Under pytest-xdist the first test process that needs it trains it, holding a lock in the folder the processes
    share, and the others read its result (pytest-xdist's documented pattern; its ``xdist_group`` marks do not
    group tests under pytest 9.2)."""
    import fcntl
    import json
    import time

    from clip_memo import memoized_run_data
    from training_helpers import load_config

    from convnext_audio_jax import training

    def train(workdir: pathlib.Path) -> dict:
        config = load_config("demo")
        config.progress_bar = False
        start = time.perf_counter()
        with memoized_run_data():  # the same clips, each synthesised once (about 300 MB, released after)
            result = training.train(config, workdir)
        return {"workdir": workdir, "result": result, "seconds": time.perf_counter() - start}

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return train(tmp_path_factory.mktemp("demo"))
    shared = tmp_path_factory.getbasetemp().parent
    with open(shared / "demo_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = shared / "demo_run.json"
        if record.exists():
            run = json.loads(record.read_text())
            return {**run, "workdir": pathlib.Path(run["workdir"])}
        run = train(shared / "demo_run")
        record.write_text(json.dumps({**run, "workdir": str(run["workdir"])}, default=float))
        return run
