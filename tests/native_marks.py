"""The pytest marks of tests that need the native kernels built (a C++ compiler; tests/test_native.py says so when
there is none) and of those that need a CPU's bfloat16 units (AMX-BF16 tiles, AVX512-BF16 dot products); a module's
native-against-XLA comparison in its own process."""

import sys

import pytest

from convnext_audio_jax import native

NO_COMPILER = "no C++ compiler ($CXX, c++, g++, clang++): the native kernels cannot be built"
# On Linux a compiler is one package away (.ci/run installs g++), so a missing one fails the native proofs instead of
# skipping them; elsewhere they skip.
NEEDS_COMPILER = pytest.mark.skipif(native.find_compiler() is None and not sys.platform.startswith("linux"),
                                    reason=NO_COMPILER)


def require_compiler() -> None:
    """At a module's top: fails it on Linux (apt-get install g++) and skips it elsewhere when no compiler is found."""
    if native.find_compiler() is not None:
        return
    if sys.platform.startswith("linux"):
        pytest.fail(f"{NO_COMPILER} (apt-get install g++; .ci/run does)", pytrace=False)
    pytest.skip(NO_COMPILER, allow_module_level=True)

# The tile kernels run only on a CPU with AMX-BF16 (e.g. Sapphire Rapids and later Xeons); elsewhere 'auto' is XLA's
# form, which the other tests cover.
NEEDS_AMX = pytest.mark.skipif(not native.amx_available(), reason="this CPU has no AMX-BF16 (or no C++ compiler): "
                               "the bfloat16 tile kernels cannot run here")
NEEDS_BF16_DOT = pytest.mark.skipif(not native.bf16_dot_available(), reason="this CPU has no AVX512-BF16 (or no C++ "
                                    "compiler): the bfloat16 dot-product kernels cannot run here")


# A module's outputs and gradients (parameters and input) with impl 'native' against impl 'xla', in a fresh process:
# a shape that crashes the native kernels fails its own test, not the test process.
_PARITY_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from convnext_audio_jax.models.conv import Conv
from convnext_audio_jax.models.layers import DepthwiseConv
make = lambda impl: eval(sys.argv[1].format(impl=repr(impl)))
x = jnp.asarray(np.random.default_rng(0).standard_normal(eval(sys.argv[2])), jnp.float32)
variables = make("xla").init(jax.random.key(0), x)
results = {}
for impl in ("native", "xla"):
    module = make(impl)
    loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
    results[impl] = (module.apply(variables, x), *jax.grad(loss, argnums=(0, 1))(variables, x))
for ours, theirs in zip(jax.tree.leaves(results["native"]), jax.tree.leaves(results["xla"])):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    error = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30) if theirs.size else 0.0
    assert error <= 1e-4, (ours.shape, error)
    print("compared", ours.shape, f"{error:.1e}")
"""


def native_equals_xla_in_a_subprocess(module: str, shape: tuple[int, ...]) -> str:
    """Runs :data:`_PARITY_SCRIPT` for ``module`` (an expression with ``{impl}``) on an input of ``shape``; returns
    its output (one line per compared array)."""
    import os
    import pathlib
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _PARITY_SCRIPT, module, repr(shape)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
    return result.stdout
