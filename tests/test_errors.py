"""convnext_audio_jax.runtime.errors: the domain errors the user can fix are UserErrors and keep the base classes
callers catch them by; --debug's environment twin."""

import pytest

from convnext_audio_jax.artifacts.lock import WorkdirLockedError
from convnext_audio_jax.artifacts.model_dir import CheckpointError
from convnext_audio_jax.convert.files import ConversionError
from convnext_audio_jax.data.labels import LabelFileError
from convnext_audio_jax.data.pipeline import UnreadableSourceError
from convnext_audio_jax.data.prepare import SplitLocked
from convnext_audio_jax.data.records import RecordError
from convnext_audio_jax.data.spec import SpecError
from convnext_audio_jax.data.teacher import MissingTeacherError, TeacherFileError
from convnext_audio_jax.export import ExportError
from convnext_audio_jax.hub.download import DownloadError
from convnext_audio_jax.hub.pretrained import PretrainedError
from convnext_audio_jax.runtime import errors
from convnext_audio_jax.runtime.distributed import DistributedConfigError
from convnext_audio_jax.training.config import ConfigError
from convnext_audio_jax.training.loop import NonFiniteLossError, TooManySkippedError


@pytest.mark.parametrize("error, also", [
    (CheckpointError, ValueError), (PretrainedError, ValueError), (DownloadError, ValueError), (ExportError, ValueError),
    (ConversionError, ValueError), (ConfigError, ValueError), (DistributedConfigError, ValueError),
    (SpecError, ValueError), (LabelFileError, ValueError), (TeacherFileError, ValueError),
    (MissingTeacherError, TeacherFileError), (RecordError, ValueError), (SplitLocked, Exception),
    (WorkdirLockedError, RuntimeError), (TooManySkippedError, RuntimeError), (UnreadableSourceError, RuntimeError),
])
def test_errors_the_user_can_fix_are_user_errors_and_keep_their_bases(error, also):
    assert issubclass(error, errors.UserError) and issubclass(error, also)


def test_a_diverged_run_is_not_a_user_error():
    """train.py still reports it on one line (it says where the last good checkpoint is), but it is no bad input."""
    assert not issubclass(NonFiniteLossError, errors.UserError)


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("no", False), ("1", True), ("true", True),
                                             (" yes ", True), ("ON", True)])
def test_debug_from_the_environment(value, expected, monkeypatch):
    monkeypatch.setenv(errors.DEBUG_ENV, value)
    assert errors.debugging() is expected
    assert errors.debugging(True) is True


def test_one_line():
    assert errors.one_line(errors.UserError("a\nb")) == "a b"
