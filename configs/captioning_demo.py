"""Demo: audio captioning on the captioned synthetic demo set, with the demo tagger frozen.

    python train.py --config configs/demo.py --workdir workdir/demo
    python train.py --config configs/captioning_demo.py --workdir workdir/captioning_demo
    convnext-audio caption clip.wav --model workdir/captioning_demo

The first command trains the frozen encoder; the second trains a small transformer decoder (2 layers, width 128)
on its sequence embeddings, validated on the demo's eval split by beam-search (beam 2) captions scored with
CIDEr-D, BLEU-4 and ROUGE-L.

MEASURED (AMD EPYC Zen 3, AVX2, 2 cores shared with other jobs; encoder = configs/demo.py's tagger trained 800
steps; validation = the demo's eval split, 256 clips x 5 captions; benchmarks/downstream_demo.py):

    captions                                          CIDEr-D  BLEU-4  ROUGE-L  METEOR
    best constant caption (of the 200 most frequent)  0.474    0.195   0.418    -
    decoder, greedy (beam 1), step 1500               1.475    0.491   0.633    0.348
    decoder, beam 2, step 1500                        1.615    0.506   0.655    0.347

(METEOR computed afterwards on the saved model/best: the run itself predates the METEOR option.)

e.g. "there is a low rumble" for a clip captioned "There is a low rumble". 1.5 training steps/s on the loaded
CPU (batch 64); the whole run 18 min wall, the encoder's pass over the 2304 clips once (then cached).
"""

from convnext_audio_jax.downstream.captioning import captioning_config


def get_config():
    config = captioning_config()
    config.encoder = "workdir/demo"
    config.hop_seconds = 1.0
    config.data.train = "demo-captions@train"
    config.data.validation = "demo-captions@eval"
    config.data.demo_train_clips = 2048
    config.data.demo_val_clips = 256
    config.decoder.max_length = 20
    config.decoder.width = 128
    config.decoder.layers = 2
    config.decoder.heads = 4
    config.decoder.feedforward = 512
    config.decoder.dropout = 0.1
    config.batch_size = 64
    config.total_steps = 1500
    config.learning_rate = 1e-3
    config.warmup_steps = 100
    config.eval_every = 500
    config.log_every = 50
    return config
