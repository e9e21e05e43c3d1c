"""The pytest marks of tests that need the native kernels built (a C++ compiler; tests/test_native.py says so when
there is none) and of those that need a CPU's bfloat16 units (AMX-BF16 tiles, AVX512-BF16 dot products)."""

import pytest

from convnext_audio_jax import native

NEEDS_COMPILER = pytest.mark.skipif(native.find_compiler() is None,
                                    reason="no C++ compiler ($CXX, c++, g++, clang++): the native kernels cannot be built")

# The tile kernels run only on a CPU with AMX-BF16 (e.g. Sapphire Rapids and later Xeons); elsewhere 'auto' is XLA's
# form, which the other tests cover.
NEEDS_AMX = pytest.mark.skipif(not native.amx_available(), reason="this CPU has no AMX-BF16 (or no C++ compiler): "
                               "the bfloat16 tile kernels cannot run here")
NEEDS_BF16_DOT = pytest.mark.skipif(not native.bf16_dot_available(), reason="this CPU has no AVX512-BF16 (or no C++ "
                                    "compiler): the bfloat16 dot-product kernels cannot run here")
