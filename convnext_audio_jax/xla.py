"""``jit`` with the XLA compiler options this project's models want on each backend.

On XLA:CPU (jax 0.10), the default YNNPACK fusions swallow the depthwise shift-sum and the
dense layers' bias broadcasts into one fusion that materialises every shifted slice and a full
broadcast of each bias: the ConvNeXt-Tiny forward ran 1.5–1.7× slower with them than without
(batch 8 of 10 s clips: 1.46 vs 2.15 clips/s on the 2-core CPU). Disabling XNNPACK as well, or
asking for oneDNN (a no-op in these jaxlib wheels: no oneDNN custom calls appear), changed
nothing measurable. Options are passed per compilation, so nothing global is changed; other
backends get none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The compiler options for ``backend`` (default: jax's default backend)."""
    return dict(CPU_COMPILER_OPTIONS) if (backend or jax.default_backend()) == "cpu" else {}


def jit(fun: Callable | None = None, **jit_kwargs: Any):
    """``jax.jit`` plus :func:`compiler_options`; usable as ``@jit`` or ``@jit(donate_argnums=…)``.

    Explicit ``compiler_options`` in ``jit_kwargs`` override the defaults."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    options = {**compiler_options(), **jit_kwargs.pop("compiler_options", {})}
    return jax.jit(fun, compiler_options=options or None, **jit_kwargs)
