"""CNN14Sep (CNN14 with a depthwise second conv per block, 30.5M params) on AudioSet (paper, Table 1).

    python train.py --config configs/cnn14sep.py --workdir runs/cnn14sep

Paper: mAP .436. Recipe: configs/_pann.py.
"""

from configs._pann import pann_config


def get_config():
    return pann_config("cnn14sep")
