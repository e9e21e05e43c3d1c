"""``convnext-audio serve`` under load, and live tagging from a pipe: throughput, latency, real-time factor.

    python benchmarks/serve.py [--model convnext_tiny] [--tiny] [--clients 1 4 16] [--requests 32]
                               [--live-seconds 30] [--workdir DIR]

A model folder with random weights (``--tiny``: a 4-stage ConvNeXt with dims 8-64, to check the machinery
quickly) is served by the real command (``python -m convnext_audio_jax.cli serve``, its own process) once with
cross-request batching and once with ``--no-batching``. For 1, 4 and 16 concurrent clients (threads of this
process, each posting a 10 s 32 kHz 16-bit WAV to ``/v1/tag`` and waiting for the answer, ``--requests`` in all
per level (at least one per client), after one warm-up request that compiles the forward): requests/s and p50/p95 latency. Then live mode: ``tag -
--stream --hop 1`` fed 16 kHz s16le at real time for ``--live-seconds`` (latency of each line: p50/p95), and
fed as fast as the pipe takes it (the real-time factor: processing seconds per second of audio). Prints Markdown
tables with the CPU model, its flags and the load average (the machine may be shared: compare rows of one run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import soundfile

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
# The commands run in their own processes from this checkout (not another installed copy of the package).
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def make_model_dir(folder: pathlib.Path, name: str, tiny: bool) -> str:
    import jax

    from convnext_audio_jax.artifacts.model_dir import save_model
    from convnext_audio_jax.models import create_model, init_variables

    overrides = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)) if tiny else {}
    model = create_model(name, **overrides)
    variables = init_variables(model, jax.random.key(0))
    return str(save_model(folder / name, name, variables, {}, overrides or None))


def clip_bytes(seconds: float = 10.0, rate: int = 32_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    buffer = io.BytesIO()
    soundfile.write(buffer, signal.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, body: bytes, boundary: str) -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/tag", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        json.loads(answer.read())
    return time.perf_counter() - start


def serve_rows(model_dir: str, batching: bool, clients: list[int], requests: int, batch_size: int) -> list[dict]:
    port = free_port()
    command = [sys.executable, "-m", "convnext_audio_jax.cli", "serve", model_dir, "--port", str(port),
               "--batch-size", str(batch_size), "--workers", str(max(clients)), "--max-queue", "256"]
    server = subprocess.Popen(command + ([] if batching else ["--no-batching"]), stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}") from None
                time.sleep(0.5)
        boundary = "benchmarkboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip.wav\"\r\n\r\n"
                .encode() + clip_bytes() + f"\r\n--{boundary}--\r\n".encode())
        post(port, body, boundary)  # compiles the forward
        rows = []
        for count in clients:
            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                total = max(requests, count)
                start = time.perf_counter()
                latencies = list(pool.map(lambda _: post(port, body, boundary), range(total)))
                wall = time.perf_counter() - start
            latencies.sort()
            rows.append({"batching": batching, "clients": count, "requests": total, "rps": total / wall,
                         "p50": statistics.median(latencies),
                         "p95": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]})
            print(f"  {'batched' if batching else 'unbatched'}, {count} clients: {rows[-1]['rps']:.2f} req/s",
                  file=sys.stderr, flush=True)
        return rows
    finally:
        server.terminate()
        server.wait(30)


def live_rows(model_dir: str, seconds: float) -> dict:
    rate, hop = 16_000, 1.0
    t = np.arange(int(seconds * rate)) / rate
    pcm = (3000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    command = [sys.executable, "-m", "convnext_audio_jax.cli", "tag", "-", "--stream", "--input-format", "s16le",
               "--input-rate", str(rate), "--hop", str(hop), "--checkpoint", model_dir]
    results = {}
    for paced in (True, False):
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
        # Warm-up: the first window compiles; it is fed before timing starts and its line dropped.
        child.stdin.write(np.zeros(11 * rate, "<i2").tobytes())
        child.stdin.flush()
        child.stdout.readline()
        step = rate // 10 * 2  # 0.1 s of s16le
        start = time.perf_counter()
        for at in range(0, len(pcm), step):
            child.stdin.write(pcm[at : at + step])
            child.stdin.flush()
            if paced:
                time.sleep(max(0.0, start + (at + step) / (2 * rate) - time.perf_counter()))
        child.stdin.close()
        lines = [json.loads(line) for line in child.stdout]
        wall = time.perf_counter() - start
        child.wait()
        if paced:
            latencies = sorted(line["latency_ms"] for line in lines)
            results.update(windows=len(lines), p50_ms=statistics.median(latencies),
                           p95_ms=latencies[int(round(0.95 * (len(latencies) - 1)))])
        else:
            results["rtf"] = wall / seconds
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--tiny", action="store_true", help="a tiny random ConvNeXt (checks the machinery)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="timed requests per concurrency level")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--live-seconds", type=float, default=30.0)
    parser.add_argument("--workdir", help="folder for the model (default: a temporary folder)")
    args = parser.parse_args(argv)
    from benchmarks.common import cpu_model_name, cpu_speed_flags

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        model_dir = make_model_dir(pathlib.Path(workdir), args.model, args.tiny)
        rows = []
        for batching in (True, False):
            rows += serve_rows(model_dir, batching, args.clients, args.requests, args.batch_size)
        live = live_rows(model_dir, args.live_seconds)
    name = f"{'tiny ' if args.tiny else ''}{args.model}"
    print(f"`convnext-audio serve`, {name} (random weights), 10 s 32 kHz WAV per request, batch {args.batch_size}; "
          f"{cpu_model_name()} ({os.cpu_count()} cores; {', '.join(cpu_speed_flags())}); "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| cross-request batching | clients | requests | requests/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'yes' if r['batching'] else 'no'} | {r['clients']} | {r['requests']} | {r['rps']:.2f} | "
              f"{r['p50']:.2f} | {r['p95']:.2f} |")
    print(f"\nLive (`tag - --stream --hop 1`, 16 kHz s16le): {live['windows']} windows at real time, latency p50 "
          f"{live['p50_ms']:.0f} ms, p95 {live['p95_ms']:.0f} ms; real-time factor {live['rtf']:.3f} "
          f"({args.live_seconds:g} s of audio fed as fast as the pipe takes it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
