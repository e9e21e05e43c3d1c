"""benchmarks/run.py's machinery on a tiny configuration: the JSON and PNG it writes, not its timings."""

from __future__ import annotations

import importlib.util
import json
from unittest import mock

import pytest
import torch  # noqa: F401  (the [test] extra; the run measures parity against the PyTorch reference)

from benchmarks import run

HAS_AUDAX = importlib.util.find_spec("audax") is not None
ROW_KEYS = {"mode", "model", "implementation", "dtype", "batch", "clip_seconds", "params", "times_s", "clips_per_s",
            "peak_memory_mb", "memory_method"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    argv = ["--models", "convnext_tiny", "--tiny", "--seconds", "1", "--batch", "2", "--dtypes", "float32",
            "--repeats", "1", "--no-compile", "--no-train", "--out-dir", str(out)]
    progress = []
    benchmark = run.benchmark

    def recording(*args, on_progress=None, **kwargs):
        def record(partial):
            progress.append(len(partial["rows"]))
            on_progress(partial)
            assert json.loads(next(out.glob("*.json")).read_text())["complete"] is False
        return benchmark(*args, on_progress=record, **kwargs)

    with mock.patch.object(run, "benchmark", recording):
        assert run.main(argv) == 0
    assert progress and progress[-1] > 0  # the JSON was written while the run went on
    written = sorted(p.name for p in out.iterdir())
    json_files = [name for name in written if name.endswith(".json")]
    assert len(json_files) == 1 and json_files[0].endswith("-tiny.json")
    assert json_files[0].replace(".json", ".png") in written
    png = (out / json_files[0].replace(".json", ".png")).read_bytes()
    assert png.startswith(b"\x89PNG")
    return json.loads((out / json_files[0]).read_text())


def test_top_level_keys(result):
    assert result["complete"] is True
    assert {"schema_version", "date", "machine", "settings", "rows", "ratios", "parity_max_abs_probs", "notes",
            "published", "wall_s"} <= set(result)
    assert {"slug", "backend", "device_kind", "cpu_count", "jax"} <= set(result["machine"])
    assert result["settings"]["tiny"] and result["settings"]["batches"] == [2]
    # The published figures the report sets beside the measured ones, for the models measured.
    assert result["published"]["convnext_tiny"] == run.PUBLISHED["convnext_tiny"]


def test_ours_and_torch_rows(result):
    by_impl = {row["implementation"]: row for row in result["rows"]}
    ours, torch_eager = by_impl["ours"], by_impl["torch-eager"]
    for row in (ours, torch_eager):
        assert "error" not in row
        assert ROW_KEYS <= set(row)
        assert len(row["times_s"]) == 1 and row["clips_per_s"] > 0
    assert {"gflops_per_clip", "compile_s", "xla_temp_mb", "max_abs_diff_vs_torch_fp32"} <= set(ours)
    assert ours["gflops_per_clip"] > 0
    assert ours["params"] == torch_eager["params"]
    # Same converted weights on both sides: the tiny model agrees like the full one.
    assert ours["max_abs_diff_vs_torch_fp32"] < 1e-4
    assert result["parity_max_abs_probs"]["convnext_tiny"]["float32/batch2"] == ours["max_abs_diff_vs_torch_fp32"]
    assert "torch-compile" not in by_impl


def test_ratios(result):
    (entry,) = result["ratios"]
    assert entry["model"] == "convnext_tiny" and entry["ours_over_torch_eager"] > 0


def test_without_audax_the_run_says_how_to_install_it(result):
    """The [test] install has no Audax (its baseline needs ``pip install --no-deps audax==0.0.3``): the run
    measures the rest and names the skip and the command in its notes instead of failing."""
    if HAS_AUDAX:
        pytest.skip("audax is installed here; this proves the run without it")
    assert "audax" in result["notes"] and "pip install --no-deps audax==0.0.3" in result["notes"]["audax"]
    assert not [row for row in result["rows"] if row["implementation"].startswith("audax")]
    assert not any(key.startswith("ours_over_audax") for key in result["ratios"][0])


def test_onnx_rows(result):
    """Ours and torch's ONNX export of the same weights, each in ONNX Runtime and OpenVINO."""
    rows = {row["implementation"]: row for row in result["rows"] if "onnx" in row["implementation"]}
    assert set(rows) == {"onnx-ort", "onnx-openvino", "torch-onnx-ort", "torch-onnx-openvino"}
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert row["clips_per_s"] > 0 and len(row["times_s"]) == 1
        # The same converted weights, exported: agrees with ours and with torch like ours does.
        assert row["max_abs_diff_vs_ours"] < 1e-4 and row["max_abs_diff_vs_torch_fp32"] < 1e-4
    (entry,) = result["ratios"]
    assert entry["ours_over_onnx_ort"] > 0 and entry["ours_over_torch_onnx_openvino"] > 0
    assert entry["onnx_ort_over_torch_onnx_ort"] == rows["onnx-ort"]["clips_per_s"] / rows["torch-onnx-ort"]["clips_per_s"]
    assert entry["onnx_openvino_over_torch_onnx_openvino"] > 0


def test_torch_dtypes_leave_out_torch_rows():
    """--torch-dtypes float32 on a float32 + bfloat16 run: ours in both, torch's forward in float32 only, the
    bfloat16 parity still measured against torch's float32 output, and the skip named in the notes."""
    case = run.Case("convnext_tiny", 0.5, tuple(run.TINY_CONVNEXT.items()))
    measured = run.benchmark([case], [2], ["float32", "bfloat16"], 1, with_torch=True, torch_dtypes=["float32"],
                             compile_timeout=None, with_audax=False, with_train=False, with_onnx=False, log=lambda _: None)
    rows = {(row["implementation"], row["dtype"]) for row in measured["rows"]}
    assert rows == {("ours", "float32"), ("ours", "bfloat16"), ("torch-eager", "float32")}
    assert set(measured["parity_max_abs_probs"]["convnext_tiny"]) == {"float32/batch2", "bfloat16/batch2"}
    assert measured["notes"]["torch/bfloat16"] == "forward rows skipped (--torch-dtypes)"
    with pytest.raises(SystemExit):  # a torch dtype the run does not measure
        run.main(["--dtypes", "float32", "--torch-dtypes", "bfloat16", "--no-torch"])
