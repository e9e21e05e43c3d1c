"""ConvNeXt-Tiny on AudioSet from the ImageNet weights: the paper's best model (Table 3, last row).

Data (the paper's: balanced + unbalanced train, scored on eval), packed once per split into one folder:

    convnext-audio prepare --audio-dir AUDIO --segments balanced_train_segments.csv \
        --labels class_labels_indices.csv --output data/audioset
    convnext-audio prepare --audio-dir AUDIO --segments unbalanced_train_segments.csv \
        --labels class_labels_indices.csv --output data/audioset
    convnext-audio prepare --audio-dir AUDIO --segments eval_segments.csv \
        --labels class_labels_indices.csv --output data/audioset

    python train.py --config configs/convnext_tiny_audioset.py --workdir runs/convnext_tiny \
        --config.init_from=CONVERTED_IMAGENET_CONVNEXT_TINY

TFDS variant (the builder on one host or a Beam cluster, docs/data.md; no TensorFlow needed):

    python -m convnext_audio_jax.data.tfds_builder --manual-dir MANUAL --data-dir data/tfds
    python train.py --config configs/convnext_tiny_audioset.py --workdir runs/convnext_tiny \
        --config.init_from=CONVERTED_IMAGENET_CONVNEXT_TINY --config.data.tfds_data_dir=data/tfds \
        --config.data.labels_csv=MANUAL/class_labels_indices.csv \
        --config.data.train=tfds:audioset/int16@balanced_train+tfds:audioset/int16@unbalanced_train \
        --config.data.eval=tfds:audioset/int16@eval

Paper: mAP .471 (AUC .973, d' 3.071) on the AudioSet eval set. Recipe (section 6 and the authors' code):
effective batch 512 (8 devices x 64; fewer devices accumulate), 75k steps, AdamW with weight decay 0.05 off
1-D params, one-cycle LR peaking at 4e-3 after 30 % with torch OneCycleLR's β1 cycling, drop path 0.4,
balanced sampling over the union of both training splits, speed perturbation, SpecAugment (< 64 frames,
< 28 bins), mixup. Validation: 1 % of the training clips held out by a hash of their id (never trained on);
model/best is chosen on it, and eval is reported at every evaluation, never used for selection.
Everything but the stem conv, bn0 and the classifier comes from ImageNet (the other shapes do not match
and keep their initial values).
"""

from convnext_audio_jax.training.config import default_config


def get_config():
    config = default_config()
    config.model.name = "convnext_tiny"
    config.model.drop_path_rate = 0.4
    config.model.dtype = "auto"  # bfloat16 compute on a GPU/TPU (float32 parameters and front end), float32 on the CPU
    config.optimizer.cycle_beta1 = True
    config.data.train = "data/audioset@balanced_train+data/audioset@unbalanced_train"
    config.data.validation = "holdout:1%"
    config.data.eval = "data/audioset@eval"
    config.init_from = ""  # set on the command line: the converted ImageNet ConvNeXt-Tiny
    return config
