"""CNN14 (PANN) and CNN14 (rep.) on AudioSet (paper, Table 1).

    python train.py --config configs/cnn14.py --workdir runs/cnn14

Paper: mAP .431 for PANNs' batch 32 run and .441 for the paper's batch-512 reproduction, which this config follows. Recipe: configs/_pann.py.
"""

from configs._pann import pann_config


def get_config():
    return pann_config("cnn14")
