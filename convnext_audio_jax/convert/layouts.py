"""State-dict layouts: how each Flax variable is named in a PyTorch checkpoint.

A layout maps a Flax module path ('trunk/stage0_block1/dwconv') to a torch module prefix
('stages.0.1.dwconv') with an ordered list of regular expressions; the leaf names and tensor
layouts follow from the variable (``kernel`` → ``weight`` transposed, ``scale`` → ``weight``,
batch statistics ``mean``/``var`` → ``running_mean``/``running_var``). One table serves both
directions (PyTorch → Flax and ``--to-torch``).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    description: str
    module_rules: tuple[tuple[str, str], ...]  # (regex on the Flax module path, torch prefix template)
    classifier: str  # torch key of the classifier weight (out, in)
    family: str  # 'audio_convnext', 'imagenet_convnext' or 'pann'
    frontend_keys: bool = False  # checkpoints carry torchlibrosa's frozen STFT / mel tensors

    def torch_prefix(self, module_path: str) -> str:
        for pattern, template in self.module_rules:
            match = re.fullmatch(pattern, module_path)
            if match:
                return match.expand(template)
        raise KeyError(f"layout {self.name!r} has no name for Flax module {module_path!r}")


_AUTHORS_TRUNK = (
    (r"trunk/stem_conv", "downsample_layers.0.0"),
    (r"trunk/stem_norm", "downsample_layers.0.1"),
    (r"trunk/downsample(\d+)_norm", r"downsample_layers.\1.0"),
    (r"trunk/downsample(\d+)_conv", r"downsample_layers.\1.1"),
    (r"trunk/stage(\d+)_block(\d+)/(\w+)", r"stages.\1.\2.\3"),
    (r"trunk/stage(\d+)_block(\d+)", r"stages.\1.\2"),  # the block's own layer scale 'gamma'
    (r"head_norm", "norm"),
)

AUTHORS = Layout(
    "authors",
    "the authors' AudioSet ConvNeXt (topel/audioset-convnext-inf, convnext_tiny_471mAP.pth, HF topel/ConvNeXt-Tiny-AT)",
    ((r"bn0", "bn0"),) + _AUTHORS_TRUNK + ((r"head", "head_audioset"),),
    classifier="head_audioset.weight",
    family="audio_convnext",
    frontend_keys=True,
)

FACEBOOKRESEARCH = Layout(
    "facebookresearch",
    "a facebookresearch/ConvNeXt ImageNet checkpoint (convnext_tiny_1k_224_ema.pth)",
    _AUTHORS_TRUNK + ((r"head", "head"),),
    classifier="head.weight",
    family="imagenet_convnext",
)

TIMM = Layout(
    "timm",
    "a timm ImageNet ConvNeXt (convnext_tiny.fb_in1k)",
    (
        (r"trunk/stem_conv", "stem.0"),
        (r"trunk/stem_norm", "stem.1"),
        (r"trunk/downsample(\d+)_norm", r"stages.\1.downsample.0"),
        (r"trunk/downsample(\d+)_conv", r"stages.\1.downsample.1"),
        (r"trunk/stage(\d+)_block(\d+)/dwconv", r"stages.\1.blocks.\2.conv_dw"),
        (r"trunk/stage(\d+)_block(\d+)/norm", r"stages.\1.blocks.\2.norm"),
        (r"trunk/stage(\d+)_block(\d+)/pwconv1", r"stages.\1.blocks.\2.mlp.fc1"),
        (r"trunk/stage(\d+)_block(\d+)/pwconv2", r"stages.\1.blocks.\2.mlp.fc2"),
        (r"trunk/stage(\d+)_block(\d+)", r"stages.\1.blocks.\2"),
        (r"head_norm", "head.norm"),
        (r"head", "head.fc"),
    ),
    classifier="head.fc.weight",
    family="imagenet_convnext",
)

PANNS = Layout(
    "panns",
    "a PANNs checkpoint (qiuqiangkong/audioset_tagging_cnn, Cnn14_mAP=0.431.pth)",
    ((r"bn0", "bn0"), (r"(conv_block\d+)/(\w+)", r"\1.\2"), (r"fc1", "fc1"), (r"fc_audioset", "fc_audioset")),
    classifier="fc_audioset.weight",
    family="pann",
    frontend_keys=True,
)

LAYOUTS = {layout.name: layout for layout in (AUTHORS, FACEBOOKRESEARCH, TIMM, PANNS)}

# The layout each model family is written in by default (``--to-torch``).
NATIVE_LAYOUT = {"audio_convnext": AUTHORS, "imagenet_convnext": FACEBOOKRESEARCH, "pann": PANNS}

_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("params", "gamma"): "gamma",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}

# torchlibrosa's frozen front-end tensors, and BatchNorm's step counter, which Flax does not keep.
FRONTEND_KEYS = (
    "spectrogram_extractor.stft.conv_real.weight",
    "spectrogram_extractor.stft.conv_imag.weight",
    "logmel_extractor.melW",
)
BATCH_COUNTER = "num_batches_tracked"


def torch_key(layout: Layout, collection: str, path: tuple[str, ...]) -> str:
    """Torch state-dict key of the Flax variable ``variables[collection][path[0]]…[path[-1]]``."""
    try:
        leaf = _LEAF_NAMES[(collection, path[-1])]
    except KeyError:
        raise KeyError(f"no PyTorch name for Flax variable {collection}/{'/'.join(path)}") from None
    return f"{layout.torch_prefix('/'.join(path[:-1]))}.{leaf}"


def to_flax_array(tensor: np.ndarray, leaf: str) -> np.ndarray:
    """torch Conv2d (O, I, kH, kW) → (kH, kW, I, O) (depthwise (C, 1, kH, kW) → (kH, kW, 1, C));
    Linear (out, in) → Dense (in, out); everything else as is."""
    if leaf == "kernel":
        return np.ascontiguousarray(np.transpose(tensor, (2, 3, 1, 0) if tensor.ndim == 4 else (1, 0)))
    return tensor


def to_torch_array(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1) if array.ndim == 4 else (1, 0)))
    return array


def torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    return to_torch_array(np.empty(flax_shape, np.bool_), leaf).shape


def detect_layout(keys) -> Layout | None:
    """The layout a state dict's keys are written in, or None."""
    keys = set(keys)
    if "downsample_layers.0.0.weight" in keys:
        return AUTHORS if "head_audioset.weight" in keys or "bn0.weight" in keys else FACEBOOKRESEARCH
    if "stem.0.weight" in keys and "stages.0.blocks.0.conv_dw.weight" in keys:
        return TIMM
    if "conv_block1.conv1.weight" in keys and "fc_audioset.weight" in keys:
        return PANNS
    return None
