"""Shared settings of the PANN CNN reproductions (paper, section 4, Table 1): PANNs' training recipe at the
paper's effective batch 512 (8 GPUs x 64): Adam at a constant 1e-3 without weight decay, 64 mels,
balanced sampling, SpecAugment (< 64 frames, < 8 bins) and mixup, no speed perturbation, no drop path.
PANNs used AMSGrad; optax's AdamW here does not. The run length is not stated (20 hours on 8 V100s);
75k steps, the ConvNeXt runs' length over the same 20 hours, is used.

Data as configs/convnext_tiny_audioset.py (its docstring has the `prepare` and TFDS commands): balanced +
unbalanced train, 1 % held out for validation, eval reported. PANNs' own packed HDF5 files work as they
are, through their index files:

    python train.py --config configs/cnn14.py --workdir runs/cnn14 \
        --config.data.train=hdf5s/indexes/full_train.h5 --config.data.eval=hdf5s/indexes/eval.h5 \
        --config.data.labels_csv=metadata/class_labels_indices.csv
"""

from convnext_audio_jax.training.config import default_config


def pann_config(model_name: str):
    config = default_config()
    config.model.name = model_name
    config.model.drop_path_rate = 0.0
    config.model.dtype = "auto"  # bfloat16 compute on a GPU/TPU (float32 parameters and front end), float32 on the CPU
    config.model.frontend.n_mels = 64
    config.optimizer.schedule = "constant"
    config.optimizer.peak_learning_rate = 1e-3
    config.optimizer.weight_decay = 0.0
    config.augment.freq_max_width = 8
    config.augment.speed_perturb = False
    return config
