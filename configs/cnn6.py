"""CNN6 (PANN) and CNN6 (rep.) on AudioSet (paper, Table 1).

    python train.py --config configs/cnn6.py --workdir runs/cnn6

Paper: mAP .343 for PANNs' batch 32 run and .350 for the paper's batch-512 reproduction, which this config follows. Recipe: configs/_pann.py.
"""

from configs._pann import pann_config


def get_config():
    return pann_config("cnn6")
