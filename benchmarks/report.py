"""benchmarks/run.py's output: Markdown rows and report, and the bar chart of forward clips/s."""

from __future__ import annotations

import pathlib

import numpy as np


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


TABLE_HEADER = ("| mode | model | implementation | dtype | batch | params | GFLOPs/clip | compile s | clips/s "
                "| peak mem MiB | XLA temp MiB | max abs Δ vs torch fp32 |\n" + "|---" * 4 + "|---:" * 8 + "|")


def format_row(row: dict) -> str:
    if "error" in row:
        figures = f"failed: {row['error']} |" + " |" * 7
    else:
        params = row.get("params")
        figures = " | ".join([
            "-" if params is None else f"{params:,}",
            _cell(row.get("gflops_per_clip"), ".2f"),
            _cell(row.get("compile_s"), ".1f"),
            _cell(row.get("clips_per_s"), ".2f"),
            _cell(row.get("peak_memory_mb"), ".0f"),
            _cell(row.get("xla_temp_mb"), ".0f"),
            _cell(row.get("max_abs_diff_vs_torch_fp32"), ".1e"),
        ]) + " |"
    return f"| {row['mode']} | {row['model']} | {row['implementation']} | {row['dtype']} | {row['batch']} | {figures}"


def format_report(result: dict) -> str:
    lines = [f"# {result['machine']['slug']}: {result['machine']['device_kind']} ({result['machine']['backend']}), "
             f"{result['machine']['cpu_count']} CPU threads, {result['machine']['cpu']}; {result['date']}", "", TABLE_HEADER]
    lines += [format_row(r) for r in result["rows"]]
    lines += ["", "| mode | model | dtype | batch | ratios (ours / other, clips/s) |", "|---|---|---|---:|---|"]
    for entry in result["ratios"]:
        pairs = ", ".join(f"{k.removeprefix('ours_over_')}: {v:.2f}×" for k, v in entry.items() if k.startswith("ours_over_"))
        lines.append(f"| {entry['mode']} | {entry['model']} | {entry['dtype']} | {entry['batch']} | {pairs} |")
    lines += ["", "| model | mAP | AUC | d' | V100 clips/s | source |", "|---|---:|---:|---:|---:|---|"]
    for name, pub in result["published"].items():
        lines.append(f"| {name} | {_cell(pub.get('mAP'), '.4g')} | {_cell(pub.get('AUC'), '.4g')} | {_cell(pub.get('d_prime'), '.4g')} "
                     f"| {_cell(pub.get('v100_clips_per_s'), '.1f')} | {pub['source']} (not measured here) |")
    if result["notes"]:
        lines += [""] + [f"- {key}: {note}" for key, note in result["notes"].items()]
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    """Forward clips/s per model, one bar per implementation, one panel per (dtype, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forward = [r for r in result["rows"] if r["mode"] == "forward" and r.get("clips_per_s")]
    panels = sorted({(r["dtype"], r["batch"]) for r in forward})
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(10, 3.2 * max(len(panels), 1)), squeeze=False)
    for ax, (dtype, batch) in zip(axes[:, 0], panels):
        panel = [r for r in forward if (r["dtype"], r["batch"]) == (dtype, batch)]
        models = list(dict.fromkeys(r["model"] for r in panel))
        implementations = list(dict.fromkeys(r["implementation"] for r in panel))
        width = 0.8 / len(implementations)
        for i, implementation in enumerate(implementations):
            values = [next((r["clips_per_s"] for r in panel if r["model"] == m and r["implementation"] == implementation), 0.0)
                      for m in models]
            ax.bar(np.arange(len(models)) + i * width, values, width, label=implementation)
        ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models, rotation=20, ha="right")
        ax.set_ylabel("clips/s")
        ax.set_title(f"{result['machine']['slug']}: forward, {dtype}, batch {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
