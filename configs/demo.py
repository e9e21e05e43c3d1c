"""Demo: a small audio ConvNeXt on the built-in synthetic multi-label set (no data needed).

    python train.py --config configs/demo.py --workdir workdir/demo

Reproduces no paper row: it shows the whole recipe (sharded step, speed perturbation, SpecAugment, mixup,
AdamW + one-cycle, checkpoints, validation mAP, model/best and model/last) working end to end. Ten classes of tones, chirps, noise
bands, clicks, ... mixed at random in 1 s clips at 16 kHz (convnext_audio_jax/data/demo.py). Target:
validation mAP >= 0.95 in a few minutes on a 2-core CPU with 8 simulated devices.
"""

from convnext_audio_jax.training.config import default_config


def get_config():
    config = default_config()
    config.model.name = "convnext_tiny"
    config.model.overrides.depths = (1, 1, 1, 1)
    config.model.overrides.dims = (16, 32, 64, 128)
    config.model.drop_path_rate = 0.1
    config.model.frontend.sample_rate = 16_000
    config.model.frontend.n_fft = 512
    config.model.frontend.hop_length = 160
    config.model.frontend.n_mels = 64
    config.model.frontend.fmax = 8_000.0
    config.model.frontend.clip_seconds = 1.0

    config.data.train = "demo"  # demo@train
    config.data.validation = "demo@validation"  # selects model/best
    config.data.eval = "demo@eval"  # reported only
    config.data.demo_train_clips = 8192
    config.data.demo_val_clips = 512
    config.data.demo_eval_clips = 512
    config.data.sampling = "shuffle"

    config.batch_size = 32
    config.per_device_batch_size = 0
    config.eval_batch_size = 64
    config.total_steps = 800

    config.optimizer.peak_learning_rate = 4e-3
    config.optimizer.weight_decay = 0.05

    # 1 s clips of 101 frames and 64 mels: narrower stripes than the paper's 64 frames / 28 bins; speed
    # perturbation kept mild because the classes are defined by their frequency ranges.
    config.augment.time_max_width = 16
    config.augment.freq_max_width = 8
    config.augment.speed_min_rate = 0.9
    config.augment.speed_max_rate = 1.1

    config.checkpoint_every = 200
    config.eval_every = 200
    config.log_every = 20
    return config
