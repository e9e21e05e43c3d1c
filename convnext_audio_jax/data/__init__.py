"""AudioSet input pipeline: label/CSV parsing, clip decoding, packed sources, balanced sampling, grain loader.

Training and evaluation name data with SPEC strings (`spec.open_spec`: `DIR@SPLIT`, `FILE.h5`,
`AUDIO_DIR@CLIPS.csv`, `tfds:NAME@SPLIT`, `demo`, unions) and read it with `LoaderConfig` + `make_loader`;
see docs/data.md.
"""

from convnext_audio_jax.data.audio import CLIP_SAMPLES, SAMPLE_RATE, ClipError, load_clip
from convnext_audio_jax.data.labels import ClassLabels, read_class_labels, read_clip_list
from convnext_audio_jax.data.pipeline import ClipLoader, LoaderConfig, jax_shard_options, make_loader, mixup_pairs
from convnext_audio_jax.data.sampler import BalancedIndices
from convnext_audio_jax.data.sources import (ArrayRecordSource, ClipSource, FolderSource, PackedHdf5Source,
                                             TfdsSource, open_prepared)
from convnext_audio_jax.data.spec import SpecError, open_spec

__all__ = [
    "CLIP_SAMPLES", "SAMPLE_RATE", "ClipError", "load_clip", "ClassLabels", "read_class_labels", "read_clip_list",
    "ClipLoader", "LoaderConfig", "jax_shard_options", "make_loader", "mixup_pairs", "BalancedIndices",
    "ArrayRecordSource", "ClipSource", "FolderSource", "PackedHdf5Source", "TfdsSource", "open_prepared",
    "SpecError", "open_spec",
]
