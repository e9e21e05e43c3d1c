"""Test set-up: eight simulated CPU devices so every sharding path runs, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FREEDESKTOP_SOUNDS = pathlib.Path("/usr/share/sounds/freedesktop/stereo")


@pytest.fixture(scope="session")
def freedesktop_recordings() -> list[pathlib.Path]:
    """The real Ogg recordings of Debian's sound-theme-freedesktop (installed by .ci/run)."""
    files = sorted(FREEDESKTOP_SOUNDS.glob("*.oga"))
    if not files:
        pytest.skip("Debian package sound-theme-freedesktop is not installed (apt-get install sound-theme-freedesktop)")
    return files
