"""PyTorch reference models with the original checkpoints' state-dict key names.

Used by the converter's parity tests and by the benchmarks. Needs the ``[torch]`` extra (torch, timm,
torchlibrosa: ``pip install "convnext-audio-jax[torch]"``); nothing else in the package imports it.

- ``ReferenceConvNeXt``: the authors' audio ConvNeXt (topel/audioset-convnext-inf) and the
  facebookresearch ImageNet ConvNeXt, built from **timm's** ``ConvNeXtBlock`` with torchlibrosa's
  front end in front for audio. Keys are the authors' / facebookresearch ones
  (``downsample_layers.*``, ``stages.{s}.{b}.{dwconv,norm,pwconv1,pwconv2,gamma}``, ``norm``,
  ``head_audioset`` or ``head``, ``bn0``, ``spectrogram_extractor…``, ``logmel_extractor.melW``).
- ``timm.create_model('convnext_tiny')``: the ImageNet ConvNeXt in timm naming.
- ``ReferenceCnn14`` / ``ReferenceCnn6``: PANNs' CNN14 and CNN6 (qiuqiangkong/audioset_tagging_cnn),
  ported from the published layer list with PANNs' key names (``conv_block{i}.{conv1,bn1,…}``,
  ``fc1``, ``fc_audioset``). ``panns_inference`` ships CNN14 only and downloads a labels CSV when
  its package is imported, so CNN6 cannot come from it; the tests check ``ReferenceCnn14`` against
  ``panns_inference.models.Cnn14``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

try:
    import torch
    import torch.nn.functional as F
    from timm.layers import LayerNorm2d
    from timm.models.convnext import ConvNeXtBlock
    from torch import nn
    from torchlibrosa.stft import LogmelFilterBank, Spectrogram
except ImportError as error:
    raise ImportError(f"convnext_audio_jax.convert.torch_reference needs the [torch] extra (torch, timm, torchlibrosa): "
                      f'pip install "convnext-audio-jax[torch]" ({error})') from error

# Stems of the authors' code (kernel, stride, padding as (time, mel)); mirrors
# convnext_audio_jax.models.convnext.STEM_VARIANTS, which the tests compare against.
AUDIO_STEMS = {
    "252x56": ((4, 4), (4, 4), (4, 0)),
    "56": ((18, 4), (18, 4), (9, 0)),
    "112": ((9, 2), (9, 2), (4, 0)),
    "504x28": ((4, 8), (2, 8), (5, 0)),
    "504x56": ((4, 4), (2, 4), (5, 0)),
}

# timm block attribute → authors' / facebookresearch attribute.
_AUTHORS_BLOCK_NAMES = {"conv_dw.": "dwconv.", "mlp.fc1.": "pwconv1.", "mlp.fc2.": "pwconv2."}


def _rename_keys(state_dict, prefix: str, renames: dict[str, str]) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix) :]
        for old, new in renames.items():
            if local.startswith(old):
                state_dict[prefix + new + local[len(old) :]] = state_dict.pop(key)
                break


class AuthorsConvNeXtBlock(ConvNeXtBlock):
    """timm's ConvNeXtBlock (exact GELU, LN eps 1e-6, layer scale) whose state dict uses the
    authors' names ``dwconv``, ``pwconv1``, ``pwconv2`` instead of timm's ``conv_dw``, ``mlp.fc1/2``."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__(dim, kernel_size=7, ls_init_value=1e-6, drop_path=drop_path)
        self.register_state_dict_post_hook(self._to_authors_names)
        self.register_load_state_dict_pre_hook(self._from_authors_names)

    @staticmethod
    def _to_authors_names(module, state_dict, prefix, local_metadata):
        _rename_keys(state_dict, prefix, _AUTHORS_BLOCK_NAMES)

    @staticmethod
    def _from_authors_names(module, state_dict, prefix, *args):
        _rename_keys(state_dict, prefix, {new: old for old, new in _AUTHORS_BLOCK_NAMES.items()})


# FrontendConfig fields (a model directory's ``model_config["frontend"]``) → torchlibrosa_frontend's arguments. The
# others shape no tensor of the PyTorch model: the training clip length and the JAX STFT's form.
FRONTEND_ARGUMENTS = {"sample_rate": "sample_rate", "n_fft": "n_fft", "hop_length": "hop", "n_mels": "n_mels",
                      "fmin": "fmin", "fmax": "fmax", "amin": "amin"}
_FRONTEND_UNUSED = ("clip_seconds", "stft")


def torchlibrosa_frontend(module: nn.Module, n_mels: int, sample_rate: int = 32000, n_fft: int = 1024, hop: int = 320,
                          fmin: float = 50.0, fmax: float = 14000.0, amin: float = 1e-10) -> None:
    """Adds PANNs' / the authors' frozen front end and bn0 to ``module`` under their key names."""
    module.spectrogram_extractor = Spectrogram(
        n_fft=n_fft, hop_length=hop, win_length=n_fft, window="hann", center=True, pad_mode="reflect",
        freeze_parameters=True,
    )
    module.logmel_extractor = LogmelFilterBank(
        sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, ref=1.0, amin=amin, top_db=None,
        freeze_parameters=True,
    )
    module.bn0 = nn.BatchNorm2d(n_mels)


def normalised_log_mel(module: nn.Module, waveform: torch.Tensor) -> torch.Tensor:
    """(B, samples) → (B, 1, frames, mels): log-mel, then bn0 over the mel bins via a transpose."""
    x = module.logmel_extractor(module.spectrogram_extractor(waveform))
    return module.bn0(x.transpose(1, 3)).transpose(1, 3)


class ReferenceConvNeXt(nn.Module):
    """The authors' audio ConvNeXt (``audio=True``) or the facebookresearch ImageNet ConvNeXt.

    Audio forward: waveform → log-mel (1001 × 224) → bn0 → stem Conv2d(1, 96, 4×4/4, padding (4, 0))
    + channels-first LN → timm blocks → mean over mel → max_t + mean_t → LN → Linear. Returns a
    dict: ``clipwise_output`` (sigmoid), ``clipwise_logits``, ``scene_embedding`` (after the LN),
    ``frame_embeddings`` (B, C, T', F'). ImageNet forward: images (B, 3, H, W) → logits.
    """

    def __init__(self, audio: bool = True, num_classes: int | None = None, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), stem: str = "252x56", n_mels: int = 224,
                 drop_path_rate: float = 0.0, frontend: Mapping[str, float] | None = None):
        super().__init__()
        self.audio = audio
        if audio:
            torchlibrosa_frontend(self, **{"n_mels": n_mels, **(frontend or {})})
            kernel, stride, padding = AUDIO_STEMS[stem]
            stem_conv = nn.Conv2d(1, dims[0], kernel_size=kernel, stride=stride, padding=padding)
        else:
            stem_conv = nn.Conv2d(3, dims[0], kernel_size=4, stride=4)
        layers = [nn.Sequential(stem_conv, LayerNorm2d(dims[0], eps=1e-6))]
        for i in range(1, len(dims)):
            layers.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], 2, 2)))
        self.downsample_layers = nn.ModuleList(layers)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, start = [], 0
        for depth, dim in zip(depths, dims):
            stages.append(nn.Sequential(*[AuthorsConvNeXtBlock(dim, rates[start + b]) for b in range(depth)]))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        classifier = nn.Linear(dims[-1], num_classes or (527 if audio else 1000))
        if audio:
            self.head_audioset = classifier
        else:
            self.head = classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward(self, x: torch.Tensor):
        if not self.audio:
            return self.head(self.norm(self.features(x).mean(dim=(-2, -1))))
        return self.from_log_mel(normalised_log_mel(self, x))

    def from_log_mel(self, log_mel: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs from a normalised (B, 1, T, mels) log-mel: what a training step with log-mel
        augmentations (SpecAugment, mixup) runs after its front end."""
        frames = self.features(log_mel)
        sequence = frames.mean(dim=3)
        scene = self.norm(sequence.max(dim=2).values + sequence.mean(dim=2))
        logits = self.head_audioset(scene)
        return {
            "clipwise_output": torch.sigmoid(logits),
            "clipwise_logits": logits,
            "scene_embedding": scene,
            "frame_embeddings": frames,
        }


class PannConvBlock(nn.Module):
    """PANNs' ConvBlock: [Conv k×k (no bias, 'same' padding) → BN → ReLU] × ``num_convs``, then
    average pooling (floor). CNN14: two 3×3 convs; CNN6 (ConvBlock5x5): one 5×5 conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, num_convs: int):
        super().__init__()
        for i in range(1, num_convs + 1):
            conv_in = in_channels if i == 1 else out_channels
            setattr(self, f"conv{i}", nn.Conv2d(conv_in, out_channels, kernel, padding=kernel // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(out_channels))
        self.num_convs = num_convs

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int]) -> torch.Tensor:
        for i in range(1, self.num_convs + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


class _ReferencePann(nn.Module):
    """PANNs' CNN: log-mel (64 mels) → bn0 → conv blocks with dropout 0.2 → mean over mel →
    max_t + mean_t → dropout 0.5 → ReLU(fc1) → fc_audioset (on the un-dropped fc1 output)."""

    def __init__(self, channels: Sequence[int], kernel: int, num_convs: int, pools: Sequence[tuple[int, int]],
                 num_classes: int = 527, frontend: Mapping[str, float] | None = None):
        super().__init__()
        torchlibrosa_frontend(self, **{"n_mels": 64, **(frontend or {})})
        in_channels = 1
        for i, out_channels in enumerate(channels, start=1):
            setattr(self, f"conv_block{i}", PannConvBlock(in_channels, out_channels, kernel, num_convs))
            in_channels = out_channels
        self.pools = list(pools)
        self.fc1 = nn.Linear(channels[-1], channels[-1])
        self.fc_audioset = nn.Linear(channels[-1], num_classes)

    def forward(self, waveform: torch.Tensor):
        return self.from_log_mel(normalised_log_mel(self, waveform))

    def from_log_mel(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs from a normalised (B, 1, T, 64) log-mel (see ReferenceConvNeXt.from_log_mel)."""
        for i, pool in enumerate(self.pools, start=1):
            x = F.dropout(getattr(self, f"conv_block{i}")(x, pool), p=0.2, training=self.training)
        frames = x
        x = x.mean(dim=3)
        x = x.max(dim=2).values + x.mean(dim=2)
        x = F.dropout(x, p=0.5, training=self.training)
        embedding = F.relu(self.fc1(x))
        logits = self.fc_audioset(embedding)
        return {
            "clipwise_output": torch.sigmoid(logits),
            "clipwise_logits": logits,
            "embedding": embedding,
            "frame_embeddings": frames,
        }


class ReferenceCnn14(_ReferencePann):
    def __init__(self, num_classes: int = 527, frontend: Mapping[str, float] | None = None):
        super().__init__((64, 128, 256, 512, 1024, 2048), 3, 2, [(2, 2)] * 5 + [(1, 1)], num_classes, frontend)


class ReferenceCnn6(_ReferencePann):
    def __init__(self, num_classes: int = 527, frontend: Mapping[str, float] | None = None):
        super().__init__((64, 128, 256, 512), 5, 1, [(2, 2)] * 4, num_classes, frontend)


_AUDIO_CONVNEXT = {
    "convnext_tiny": {"depths": (3, 3, 9, 3)},
    "convnext_small": {"depths": (3, 3, 27, 3)},
    **{f"convnext_tiny_stem{stem}": {"stem": stem} for stem in ("56", "112", "504x28", "504x56")},
}


def _frontend_arguments(name: str, frontend: Mapping[str, float] | None) -> dict[str, float] | None:
    """``torchlibrosa_frontend``'s arguments for a model's front-end settings (FrontendConfig field names)."""
    if frontend is None:
        return None
    unknown = sorted(set(frontend) - set(FRONTEND_ARGUMENTS) - set(_FRONTEND_UNUSED))
    if unknown:
        raise ValueError(f"{name}: front-end settings {unknown} are not FrontendConfig fields "
                         f"(expected some of {sorted(FRONTEND_ARGUMENTS)})")
    return {FRONTEND_ARGUMENTS[k]: v for k, v in frontend.items() if k in FRONTEND_ARGUMENTS}


def build_reference(name: str, *, naming: str = "facebookresearch", num_classes: int | None = None,
                    drop_path_rate: float = 0.0, frontend: Mapping[str, float] | None = None,
                    **audio_overrides) -> nn.Module:
    """The PyTorch reference for a registered model name, in eval mode.

    ``convnext_tiny`` (and ``convnext_small``, the stem variants): the authors' audio ConvNeXt;
    ``convnext_tiny_imagenet`` / ``convnext_small_imagenet``: the ImageNet ConvNeXt with
    ``naming='facebookresearch'`` keys or ``naming='timm'`` (``timm.create_model``); ``cnn14``, ``cnn6``.
    ``audio_overrides`` (``depths``, ``dims``) change an audio ConvNeXt's size, e.g. a tiny one for tests;
    ``frontend`` (FrontendConfig fields: ``sample_rate``, ``n_fft``, ``hop_length``, ``n_mels``, ``fmin``,
    ``fmax``, ``amin``) an audio model's front end. A model directory's ``model_config`` holds exactly these, so
    ``build_reference(metadata["model"], **metadata["model_config"])`` is the PyTorch model its ``convert
    --to-torch`` file loads into (the demo's 16 kHz, 64-mel front end included).
    """
    if audio_overrides and name not in _AUDIO_CONVNEXT:
        raise ValueError(f"{sorted(audio_overrides)} apply to the audio ConvNeXt models only, not {name!r}")
    if frontend is not None and name not in _AUDIO_CONVNEXT and name not in ("cnn14", "cnn6"):
        raise ValueError(f"{name!r} takes images: it has no audio front end to set")
    frontend = _frontend_arguments(name, frontend)
    if name in _AUDIO_CONVNEXT:
        model = ReferenceConvNeXt(audio=True, num_classes=num_classes, drop_path_rate=drop_path_rate,
                                  frontend=frontend, **{**_AUDIO_CONVNEXT[name], **audio_overrides})
    elif name in ("convnext_tiny_imagenet", "convnext_small_imagenet"):
        depths = (3, 3, 9, 3) if name.startswith("convnext_tiny") else (3, 3, 27, 3)
        if naming == "timm":
            import timm

            model = timm.create_model(name.removesuffix("_imagenet"), pretrained=False,
                                      num_classes=num_classes or 1000, drop_path_rate=drop_path_rate)
        elif naming == "facebookresearch":
            model = ReferenceConvNeXt(audio=False, num_classes=num_classes, depths=depths,
                                      drop_path_rate=drop_path_rate)
        else:
            raise ValueError(f"naming must be 'facebookresearch' or 'timm', got {naming!r}")
    elif name == "cnn14":
        model = ReferenceCnn14(num_classes or 527, frontend)
    elif name == "cnn6":
        model = ReferenceCnn6(num_classes or 527, frontend)
    else:
        raise ValueError(f"no PyTorch reference for model {name!r}")
    return model.eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that exercise every tensor: conv/linear weights N(0, 1/fan_in), norm scales
    around 1, biases and layer scales non-zero, BatchNorm running statistics non-trivial (bn0's
    on the log-mel's dB scale). Frozen front-end tensors are left alone."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, mean=0.0, std=1.0):
        return mean + std * torch.randn(shape, generator=generator)

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    for module_name, module in model.named_modules():
        if isinstance(module, (Spectrogram, LogmelFilterBank)):
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(normal(module.weight.shape, std=fan_in**-0.5))
            if module.bias is not None:
                module.bias.copy_(normal(module.bias.shape, std=0.1))
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            module.weight.copy_(uniform(module.weight.shape, 0.5, 1.5))
            module.bias.copy_(normal(module.bias.shape, std=0.2))
        if isinstance(module, nn.BatchNorm2d):
            if module_name.endswith("bn0"):  # log-mel in dB: around -100 … 0
                module.running_mean.copy_(uniform(module.running_mean.shape, -60.0, -20.0))
                module.running_var.copy_(uniform(module.running_var.shape, 100.0, 900.0))
            else:
                module.running_mean.copy_(normal(module.running_mean.shape, std=0.5))
                module.running_var.copy_(uniform(module.running_var.shape, 0.5, 2.0))
            module.num_batches_tracked.fill_(1000)
        gamma = getattr(module, "gamma", None)
        if isinstance(gamma, nn.Parameter):
            gamma.copy_(uniform(gamma.shape, 0.1, 0.5))
    return model
