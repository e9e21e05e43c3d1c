"""Demo: language-based audio retrieval on the captioned synthetic demo set, with the demo tagger frozen.

    python train.py --config configs/demo.py --workdir workdir/demo
    python train.py --config configs/retrieval_demo.py --workdir workdir/retrieval_demo

The first command trains the frozen encoder (10 synthetic classes); the second projects its 10 logits by one
linear layer onto all-MiniLM-L6-v2 caption embeddings (symmetric InfoNCE, learned temperature). Captions:
five per clip, composed from the clip's events with synonyms and word order varied (data/captions.py).
Validation: the demo's eval split (256 clips, 1280 captions), held out from the tagger's training and selection.

MEASURED (AMD EPYC Zen 3, AVX2, 2 cores shared with other jobs; encoder = configs/demo.py's tagger trained 800
steps; 1000 steps of batch 64, lr 3e-3; text-to-audio, validation):

    variant                       t2a mAP@10  t2a R@1  t2a R@10  a2t mAP@10
    chance (256 clips)            0.0114      0.0039   0.0391    -
    random projection (step 0)    0.0153      0.0047   0.0523    0.0133
    plain (10 logits)             0.4564      0.2711   0.9281    0.3448
    +tags (--config.tags=True)    0.4623      0.2641   0.9445    0.3413

The demo's clips have 1-3 of 10 event kinds, so many share the same events and are told apart by no caption:
the ceiling is well below 1. Cost: the encoder's pass over 1280 clips once (then cached), 35-108 projection
steps/s, the whole run 2.5-8.5 min wall (mostly embedding 6400 captions on the loaded CPU).
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
