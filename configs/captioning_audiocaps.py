"""Audio captioning on AudioCaps (the paper's Sec. 7.1) with the released AudioSet ConvNeXt frozen.

    python train.py --config configs/captioning_audiocaps.py --workdir workdir/captioning_audiocaps

with AudioCaps' clips downloaded as ``audiocaps/audio/{train,val}/{youtube_id}_{start_time}.wav`` (or PANNs'
``Y…`` names) beside ``audiocaps/{train,val}.csv`` (caption SPECs ``audiocaps:AUDIO_DIR@CSV``, data/captions.py).
The decoder is the paper's: 6 layers, 4 heads, width 256, feed-forward 2048, dropout 0.2, GELU, over a linear
projection of the frozen model's 31 × 768 sequence embeddings (10 s windows); teacher forcing with label smoothing
0.1, validation captions by beam search (beam 2).

Paper (AudioCaps test set, ConvNeXt-Tiny encoder, 12.4 M trainable parameters): SPIDEr 0.471 (the best system
then: 0.475 with 108 M trainable). SPIDEr needs SPICE (a Stanford CoreNLP download), not computed here: CIDEr-D,
BLEU-4, ROUGE-L and, where Java is present, METEOR are logged. MEASURED: not run here (AudioCaps is not on this machine).
"""

from convnext_audio_jax.downstream.captioning import captioning_config


def get_config():
    config = captioning_config()
    config.encoder = "convnext_tiny_471mAP"
    config.hop_seconds = 10.0
    config.data.train = "audiocaps:audiocaps/audio/train@audiocaps/train.csv"
    config.data.validation = "audiocaps:audiocaps/audio/val@audiocaps/val.csv"
    config.decoder.max_length = 30
    config.batch_size = 64
    config.total_steps = 50_000
    config.learning_rate = 5e-4
    config.warmup_steps = 1000
    config.eval_every = 5000
    config.log_every = 100
    return config
