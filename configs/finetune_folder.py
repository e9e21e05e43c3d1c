"""Fine-tune an AudioSet ConvNeXt-Tiny on your own folder of labelled clips (a new head of your size).

    python train.py --config configs/finetune_folder.py --workdir runs/my_task \
        --config.init_from=CONVERTED_AUDIOSET_CONVNEXT_TINY --config.data.train=AUDIO@train.csv \
        --config.data.validation=AUDIO@val.csv --config.data.labels_csv=labels.csv

Reproduces no paper row (the paper's AudioSet model, mAP .471, is the starting point). AUDIO is the folder of audio files; the CSVs list
`path,labels` (or AudioSet segment rows) against `labels.csv` (index,mid,display_name); the classifier is
re-initialised for those classes (init_exclude "head"), everything else comes from the checkpoint. Clips
are decoded to 10 s at 32 kHz on the fly. Short schedule, lower peak LR, light drop path.
"""

from convnext_audio_jax.training.config import default_config


def get_config():
    config = default_config()
    config.model.name = "convnext_tiny"
    config.model.drop_path_rate = 0.1
    config.data.train = "AUDIO@train.csv"  # set on the command line
    config.data.validation = "AUDIO@val.csv"  # or "holdout:10%" of the training clips
    config.data.eval = ""
    config.data.sampling = "shuffle"
    config.batch_size = 64
    config.per_device_batch_size = 8
    config.eval_batch_size = 32
    config.total_steps = 3000
    config.optimizer.peak_learning_rate = 2e-4
    config.init_from = ""  # set on the command line: the converted AudioSet checkpoint
    config.init_exclude = ("head",)
    config.checkpoint_every = 500
    config.eval_every = 500
    config.log_every = 20
    return config
