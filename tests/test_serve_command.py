"""``convnext-audio serve`` as a command: bad flags are one-line errors before anything loads; the models and
limits given reach the app, which uvicorn serves on 127.0.0.1 unless --host says otherwise (the command in its
own process, under load: benchmarks/serve.py)."""

import uvicorn
from serve_helpers import tiny_model_dir

from convnext_audio_jax import cli


def test_bad_flags_are_one_line_errors(capsys):
    for flags, words in [(["--max-queue", "0"], "--max-queue must be ≥ 1"),
                         (["--max-upload-mb", "-1"], "--max-upload-mb must be a positive number"),
                         (["--time-limit", "inf"], "--time-limit must be a positive number"),
                         (["--port", "70000"], "--port must be 0 to 65535")]:
        assert cli.main(["serve", "no-such-model", *flags]) == 2
        error = capsys.readouterr().err
        assert words in error and error.count("\n") == 1, error


def test_the_command_serves_the_models_on_localhost_unless_told(tmp_path_factory, monkeypatch, capsys):
    """The command's server, as it would start it: uvicorn gets the app on 127.0.0.1 (or --host) and the port."""
    model_dir = tiny_model_dir(tmp_path_factory)
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append((app, options)))
    assert cli.main(["serve", model_dir, model_dir, "--port", "8123", "--max-upload-mb", "2",
                     "--upload-time-limit", "30"]) == 0
    assert cli.main(["serve", model_dir, "--host", "0.0.0.0", "--allow-origin", "https://lab.example"]) == 0
    (app, options), (other, other_options) = started
    assert (options["host"], options["port"]) == ("127.0.0.1", 8123)
    assert (other_options["host"], other_options["port"]) == ("0.0.0.0", 7860)
    server = app.state.server
    assert list(server.models) == ["tiny", "tiny-2"] and server.limits.max_upload_bytes == 2 * 2**20
    assert server.limits.upload_time_limit == 30
    assert server.limits.allow_origins == () and other.state.server.limits.allow_origins == ("https://lab.example",)
    assert "serve: tiny, tiny-2 on http://127.0.0.1:8123/" in capsys.readouterr().err
