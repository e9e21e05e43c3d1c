"""CNN6Next (CNN6 with ConvNeXt-like blocks, Table 2, 3.3M params) on AudioSet (paper, Table 1).

    python train.py --config configs/cnn6next.py --workdir runs/cnn6next

Paper: mAP .427. Recipe: configs/_pann.py.
"""

from configs._pann import pann_config


def get_config():
    return pann_config("cnn6next")
