"""ConvNeXt-Small on AudioSet (depths 3-3-27-3; paper, section 6).

    python train.py --config configs/convnext_small.py --workdir runs/convnext_small \
        --config.init_from=CONVERTED_IMAGENET_CONVNEXT_SMALL

Paper: mAP .458 (49.9M params), below Tiny: it overfits more, hence weight decay 0.1 and drop path 0.8.
"""

from configs.convnext_tiny_audioset import get_config as tiny_config


def get_config():
    config = tiny_config()
    config.model.name = "convnext_small"
    config.model.drop_path_rate = 0.8
    config.optimizer.weight_decay = 0.1
    return config
