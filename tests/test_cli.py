"""The convnext-audio command: models table, subcommand wiring, build-native."""

import pytest

from convnext_audio_jax.cli import main
from convnext_audio_jax.models import list_models


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


@pytest.mark.parametrize("command", ["convert", "prepare", "evaluate", "predict", "tag", "embed", "export", "download"])
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
