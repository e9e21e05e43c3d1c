import sys

from convnext_audio_jax.convert.cli import main

sys.exit(main())
