"""The model zoo: one registry of every model by name.

>>> model = create_model("convnext_tiny", drop_path_rate=0.4)
>>> variables = init_variables(model, jax.random.key(0))
>>> out = model.apply(variables, waveform)            # waveform: (B, 320000) at 32 kHz
>>> out["probs"].shape                                # (B, 527)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convnext_audio_jax import native
from convnext_audio_jax.models.convnext import AudioConvNeXt, ImageNetConvNeXt
from convnext_audio_jax.models.frontend import FrontendConfig
from convnext_audio_jax.models.panns import CNN6, CNN6_NEXT, CNN14, CNN14_SEP, PannCNN
from convnext_audio_jax.runtime import xla
from convnext_audio_jax.runtime.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: its Flax class, default fields and a one-line description."""

    name: str
    module: type[nn.Module]
    defaults: dict[str, Any]
    description: str

    @property
    def takes_waveform(self) -> bool:
        return "frontend" in self.module.__dataclass_fields__


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, module: type[nn.Module], description: str, **defaults: Any) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelSpec(name, module, defaults, description)


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; registered models: {', '.join(_REGISTRY)}") from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """The Flax module registered as ``name``, with any of its fields overridden
    (``num_classes``, ``drop_path_rate``, ``dtype``, ``depthwise_impl``, ``frontend``, …). ``frontend`` may be
    a FrontendConfig or a dict of its fields (as a model directory's JSON metadata stores it)."""
    spec = get_spec(name)
    if isinstance(overrides.get("frontend"), dict):
        overrides["frontend"] = FrontendConfig(**overrides["frontend"])
    fields = spec.module.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields) - {"parent", "name"})
    if unknown:
        allowed = sorted(k for k in fields if k not in ("parent", "name"))
        raise UserError(f"model {name!r} has no field(s) {unknown}; its fields are {allowed}")
    model = spec.module(**{**spec.defaults, **overrides})
    _prepare_native(model)
    return model


# The impl values that may run a compiled CPU kernel.
_NATIVE_IMPLS = ("auto", "native", "direct", "winograd")


def _prepare_native(model: nn.Module) -> None:
    """Builds (once, cached) and loads the native CPU kernels now where the model may run them, so that no jit
    trace pays for the build (a trace does not build them: :mod:`convnext_audio_jax.native.library`); where they
    cannot be, one WARNING line says why and the model uses the XLA forms."""
    impls = [getattr(model, field) for field in ("depthwise_impl", "matmul_impl", "conv_impl", "sums_impl")
             if hasattr(model, field)]
    if any(impl in _NATIVE_IMPLS for impl in impls) and jax.default_backend() == "cpu":
        native.available()


def with_xla_ops(model: nn.Module) -> nn.Module:
    """``model`` with XLA's own grouped and dense convolutions and dot in place of the native CPU kernels, whose custom calls
    hide their FLOPs from XLA's cost analysis (same parameters, same numbers within float32 summation order)."""
    return model.clone(**{field: "xla" for field in ("depthwise_impl", "matmul_impl", "conv_impl") if hasattr(model, field)})


def example_input(model: nn.Module, batch: int = 1, seconds: float | None = None) -> jax.ShapeDtypeStruct:
    """Shape of a model's input: a 10 s waveform batch, or 224×224 RGB images."""
    if isinstance(model, ImageNetConvNeXt):
        return jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)
    frontend: FrontendConfig = model.frontend
    samples = frontend.clip_samples if seconds is None else int(round(seconds * frontend.sample_rate))
    return jax.ShapeDtypeStruct((batch, samples), jnp.float32)


def init_variables(model: nn.Module, rng: jax.Array, batch: int = 1) -> dict[str, Any]:
    """Random initial variables ({'params', 'batch_stats'}) for ``model``, as plain nested dicts.

    Under jit the forward pass that ``init`` traces is dead code (only the variables are
    returned), so XLA drops it: initialising on a full clip costs compile time only.
    """
    dummy = jnp.zeros(example_input(model, batch).shape, jnp.float32)

    def init(key):
        return model.init({"params": key}, dummy, train=False)

    if isinstance(rng, jax.core.Tracer):  # inside a caller's jit or eval_shape, which compiles it with its options
        return dict(nn.unbox(init(rng)))
    return dict(nn.unbox(xla.jit(init, compiler_options=xla.RUN_ONCE_COMPILER_OPTIONS)(rng)))


def count_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


_AUDIO_CONVNEXT_DOC = "audio ConvNeXt, stem {stem}, depths {depths}"
for _name, _depths, _stem in [
    ("convnext_tiny", (3, 3, 9, 3), "252x56"),
    ("convnext_small", (3, 3, 27, 3), "252x56"),
    ("convnext_tiny_stem56", (3, 3, 9, 3), "56"),
    ("convnext_tiny_stem112", (3, 3, 9, 3), "112"),
    ("convnext_tiny_stem504x28", (3, 3, 9, 3), "504x28"),
    ("convnext_tiny_stem504x56", (3, 3, 9, 3), "504x56"),
]:
    register_model(_name, AudioConvNeXt, _AUDIO_CONVNEXT_DOC.format(stem=_stem, depths=_depths), depths=_depths, stem=_stem)

register_model("convnext_tiny_imagenet", ImageNetConvNeXt, "ImageNet ConvNeXt-Tiny (224×224 RGB, 1000 classes)")
register_model(
    "convnext_small_imagenet", ImageNetConvNeXt, "ImageNet ConvNeXt-Small (224×224 RGB, 1000 classes)", depths=(3, 3, 27, 3)
)

register_model("cnn14", PannCNN, "PANN CNN14 (64 mels, 6 conv blocks)", **CNN14)
register_model("cnn6", PannCNN, "PANN CNN6 (64 mels, 4 conv 5x5 blocks)", **CNN6)
register_model("cnn14sep", PannCNN, "CNN14Sep: CNN14 with depthwise second convs (paper Table 1)", **CNN14_SEP)
register_model("cnn6next", PannCNN, "CNN6Next: CNN6 with ConvNeXt-like blocks (paper Table 2)", **CNN6_NEXT)

__all__ = [
    "AudioConvNeXt",
    "ImageNetConvNeXt",
    "ModelSpec",
    "PannCNN",
    "count_params",
    "create_model",
    "example_input",
    "get_spec",
    "init_variables",
    "list_models",
    "register_model",
]

