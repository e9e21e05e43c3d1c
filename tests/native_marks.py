"""The pytest mark of tests that need the native kernels built: they need a C++ compiler (tests/test_native.py
says so when there is none)."""

import pytest

from convnext_audio_jax import native

NEEDS_COMPILER = pytest.mark.skipif(native.find_compiler() is None,
                                    reason="no C++ compiler ($CXX, c++, g++, clang++): the native kernels cannot be built")
