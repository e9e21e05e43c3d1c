"""``python -m convert`` from a checkout: the entry point only.

The converter library is ``convnext_audio_jax.convert`` (installed with the package; this folder is not,
so no top-level ``convert`` package shadows another one in site-packages).
"""
