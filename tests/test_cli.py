"""The convnext-audio command: models table, subcommand wiring, build-native; errors (a UserError is one line and exit
2, anything else a traceback, --debug shows the UserError's too); --offline reaching the model's resolution."""

import os

import pytest

from convnext_audio_jax import cli
from convnext_audio_jax.cli import main
from convnext_audio_jax.hub import pretrained
from convnext_audio_jax.models import list_models
from convnext_audio_jax.runtime.errors import DEBUG_ENV, UserError


def test_models_table_lists_every_model_with_exact_counts(capsys):
    assert main(["models", "--no-flops"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert f"\n{name} " in out
    assert "28,222,767" in out and "80,753,615" in out and "4,837,455" in out
    assert "32 kHz, 224 mels, 1001 frames" in out and "32 kHz, 64 mels, 1001 frames" in out


def test_models_table_reports_xla_gflops(capsys):
    assert main(["models", "convnext_tiny", "cnn6"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith(("convnext_tiny", "cnn6"))}
    # ConvNeXt-Tiny: the paper's 21.1 G multiply-adds per 10 s clip = ~43 GFLOPs.
    gflops = float(rows["convnext_tiny"].split("frames")[1].split()[0])
    assert 40 < gflops < 46


def test_unknown_model_is_one_line_error(capsys):
    assert main(["models", "convnext_giant", "--no-flops"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'convnext_giant'" in err


@pytest.mark.parametrize("command", ["convert", "prepare", "evaluate", "predict", "tag", "embed", "export", "download",
                                     "index", "search", "caption"])
def test_subcommands_are_wired(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: convnext-audio " + command in capsys.readouterr().out


def test_build_native_builds_or_says_why_not(capsys, monkeypatch):
    """The library is there after the command (built now, or earlier: the test session builds it first); where it
    cannot be built the command says why in one line and fails."""
    from convnext_audio_jax import native

    if native.available():
        assert main(["build-native"]) == 0
        out = capsys.readouterr().out.strip()
        assert out.endswith(("already built", " s")) and native.library._state["path"].exists()
    monkeypatch.setattr(native.library, "_state", {})
    monkeypatch.setenv("CONVNEXT_AUDIO_JAX_NATIVE", "0")
    assert main(["build-native"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disabled by CONVNEXT_AUDIO_JAX_NATIVE=0" in err


def failing_models_command(monkeypatch, error: BaseException) -> None:
    def run(args):
        raise error

    monkeypatch.setattr(cli, "_models_table", run)
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def test_a_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    failing_models_command(monkeypatch, UserError("no such file: x.csv\n(a second line)"))
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "convnext-audio models: error: no such file: x.csv (a second line)\n"


@pytest.mark.parametrize("error", [ValueError("a bug's ValueError"), RuntimeError("a bug"), KeyError("key")])
def test_any_other_error_keeps_its_traceback(error, monkeypatch, capsys):
    failing_models_command(monkeypatch, error)
    with pytest.raises(type(error)) as raised:
        main(["models"])
    assert raised.value is error and capsys.readouterr().err == ""


def test_debug_shows_a_user_errors_traceback(monkeypatch, capsys):
    error = UserError("bad flag")
    failing_models_command(monkeypatch, error)
    with pytest.raises(UserError) as raised:
        main(["--debug", "models"])
    assert raised.value is error
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError):
        main(["models"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flag", [[], ["--offline"]])
def test_offline_reaches_the_models_resolution_and_leaves_the_environment_alone(flag, monkeypatch, capsys, tmp_path):
    """--offline is passed down to pretrained.resolve (the network decision), not written into os.environ; without
    it, resolve gets None and CONVNEXT_AUDIO_OFFLINE decides."""
    asked = []

    def resolve(name, *, offline=None):
        asked.append((name, offline))
        raise pretrained.PretrainedError(f"{name}: not fetched in this test")

    monkeypatch.setattr(pretrained, "resolve", resolve)
    monkeypatch.delenv(pretrained.OFFLINE_ENV, raising=False)
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"")
    commands = [["tag", str(audio), "--checkpoint", "some_name"],
                ["embed", str(audio), "--output", str(tmp_path / "e.npz"), "--checkpoint", "some_name"],
                ["evaluate", "--data", "demo", "--compilation-cache=", "--checkpoint", "some_name"],
                ["export", "some_name", "--format", "onnx", "--output", str(tmp_path / "m.onnx")]]
    for command in commands:
        assert main([*flag, *command]) == 2, command
        assert capsys.readouterr().err.strip() == f"convnext-audio {command[0]}: error: some_name: not fetched in this test"
    assert asked == [("some_name", True if flag else None)] * 4
    assert pretrained.OFFLINE_ENV not in os.environ


def test_an_onnx_file_without_its_backend_gets_the_hint(tmp_path, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: the hint comes first")
    for command in (["tag", str(tmp_path / "a.wav")], ["embed", str(tmp_path / "a.wav"), "--output", str(tmp_path / "e.npz")]):
        assert main([*command, "--checkpoint", str(model)]) == 2
        assert capsys.readouterr().err.strip() == (f"convnext-audio {command[0]}: error: --checkpoint {model} is an ONNX "
                                                   "export: run it with --backend onnxruntime (or openvino)")
    assert not (tmp_path / "e.npz").exists()
