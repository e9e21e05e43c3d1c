import sys

from convnext_audio_jax.hub.convert_command import main

sys.exit(main())
