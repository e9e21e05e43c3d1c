"""ConvNeXt-Tiny on AudioSet from the ImageNet weights: the paper's best model (Table 3, last row).

    python train.py --config configs/convnext_tiny_audioset.py --workdir runs/convnext_tiny \
        --config.data.path=DATA --config.init_from=CONVERTED_IMAGENET_CONVNEXT_TINY

Paper: mAP .471 (AUC .973, d' 3.071) on the AudioSet eval set. Recipe (section 6 and the authors' code):
effective batch 512 (8 devices x 64; fewer devices accumulate), 75k steps, AdamW with weight decay 0.05 off
1-D params, one-cycle LR peaking at 4e-3 after 30 % with torch OneCycleLR's β1 cycling, drop path 0.4,
balanced sampling, speed perturbation, SpecAugment (< 64 frames, < 28 bins), mixup. DATA is a
`convnext-audio prepare` folder with the training split and a held-out `validation` split (the best
checkpoint is chosen on it; report on eval separately). Everything but the stem conv, bn0 and the
classifier comes from ImageNet (the other shapes do not match and keep their initial values).
"""

from convnext_audio_jax.train_lib import default_config


def get_config():
    config = default_config()
    config.model.name = "convnext_tiny"
    config.model.drop_path_rate = 0.4
    config.optimizer.cycle_beta1 = True
    config.init_from = ""  # set on the command line: the converted ImageNet ConvNeXt-Tiny
    return config
