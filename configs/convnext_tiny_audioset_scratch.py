"""ConvNeXt-Tiny on AudioSet from random initialisation (paper, section 6: "random init").

    python train.py --config configs/convnext_tiny_audioset_scratch.py --workdir runs/convnext_tiny_scratch

Paper: mAP .462 (AUC .970, d' 3.031), 0.9 points below the ImageNet-initialised model. Same recipe as
configs/convnext_tiny_audioset.py without init_from.
"""

from configs.convnext_tiny_audioset import get_config as imagenet_config


def get_config():
    config = imagenet_config()
    config.init_from = ""
    return config
