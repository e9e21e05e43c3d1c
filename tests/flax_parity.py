"""Our layers against flax's: same parameters, outputs returned for the caller's check, gradients compared."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def outputs_and_gradients_against(ours, reference, x, dtype):
    """Initialises ``reference`` on ``x``, asserts ``ours`` has the same parameter shapes, perturbs the parameters,
    asserts the gradients (parameters and input) of Σ output² agree within float32 summation order (bfloat16:
    2e-2), and returns both outputs."""
    variables = reference.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
    variables = jax.tree.map(lambda v: v + jax.random.normal(jax.random.key(2), v.shape), variables)
    got, expected = ours.apply(variables, x), reference.apply(variables, x)
    assert got.dtype == expected.dtype
    grads = [jax.grad(lambda v, x, m=m: (m.apply(v, x).astype(jnp.float32) ** 2).sum(), argnums=(0, 1))(variables, x)
             for m in (ours, reference)]
    tolerance = 1e-5 if dtype is None else 2e-2
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())
    return np.asarray(got, np.float32), np.asarray(expected, np.float32)
