"""The collectives of a compiled program, read from its optimized HLO: which, how many bytes, and whether they
sit inside a loop (run once per iteration). XLA's SPMD partitioner is the same on every backend, so the CPU's
compiled program shows the communication a multi-GPU step would have (docs/train.md, "Training at scale")."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import numpy as np

# HLO ops that move data between devices (async forms are counted at their "-start").
COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                  "collective-broadcast", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z\-]+)\((.*)$")
_CALLED = re.compile(r"\b(body|condition|to_apply|calls|branch_computations|true_computation|false_computation)="
                     r"(?:\{([^}]*)\}|%?([\w.\-]+))")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: its op, result bytes, the computation it is in and whether that computation
    runs inside a while loop's body (directly or through the computations it calls)."""

    op: str
    bytes: int
    computation: str
    in_loop: bool


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an HLO module's text (``compiled.as_text()``)."""
    found: list[tuple[str, int, str]] = []
    calls: dict[str, set[str]] = {}
    loop_bodies: set[str] = set()
    current = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0].split("(")[0]:
            current = header.group(1)
            calls.setdefault(current, set())
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        result, op, rest = instruction.groups()
        for kind, listed, single in _CALLED.findall(rest):
            names = listed or single
            targets = {name.strip().lstrip("%") for name in names.split(",") if name.strip()}
            calls[current].update(targets)
            if kind == "body":
                loop_bodies.update(targets)
        base = op[:-len("-start")] if op.endswith("-start") else op
        if base in COLLECTIVE_OPS:
            found.append((base, _shape_bytes(result), current))
    inside: set[str] = set()
    stack = list(loop_bodies)
    while stack:  # everything a loop body calls runs in the loop too
        name = stack.pop()
        if name not in inside:
            inside.add(name)
            stack.extend(calls.get(name, ()))
    return [Collective(op, size, computation, computation in inside) for op, size, computation in found]


def summary(found: Iterable[Collective]) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes", "in_loop"}} over ``found``."""
    table: dict[str, dict[str, int]] = {}
    for c in found:
        row = table.setdefault(c.op, {"count": 0, "bytes": 0, "in_loop": 0})
        row["count"] += 1
        row["bytes"] += c.bytes
        row["in_loop"] += int(c.in_loop)
    return table


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree (of arrays or ShapeDtypeStructs): the gradient's size."""
    import jax

    return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))
