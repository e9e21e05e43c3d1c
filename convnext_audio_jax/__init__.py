"""convnext-audio-jax: the audio ConvNeXt of Pellegrini et al. (Interspeech 2023) and PANN CNNs in JAX/Flax."""

__version__ = "0.1.0"
