"""PyTorch state dict ⇄ Flax variables for the registered models.

Every Flax variable of the target model must come from exactly one tensor of the right shape;
a missing, unexpected or wrong-shaped tensor is an error naming it — never a partial load. The
only tensors that are not parameters are torchlibrosa's frozen front-end tensors (checked against
our front end, then dropped) and BatchNorm's ``num_batches_tracked`` (dropped).

The one deliberate exception is the paper's ImageNet initialisation of the audio ConvNeXt
(``imagenet_init``): the trunk and the final LayerNorm come from an ImageNet ConvNeXt, while the
stem conv (or, optionally, the RGB stem kernel averaged to one channel), bn0 and the classifier
are freshly initialised; the metadata lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from convnext_audio_jax.convert.files import ConversionError
from convnext_audio_jax.convert.layouts import (
    BATCH_COUNTER,
    FRONTEND_KEYS,
    LAYOUTS,
    NATIVE_LAYOUT,
    Layout,
    detect_layout,
    to_flax_array,
    to_torch_array,
    torch_key,
    torch_shape,
)
from convnext_audio_jax.models import create_model, get_spec, init_variables
from convnext_audio_jax.models.convnext import (
    STEM_VARIANTS,
    AudioConvNeXt,
    ImageNetConvNeXt,
)
from convnext_audio_jax.models.frontend import FrontendConfig, mel_filterbank
from convnext_audio_jax.runtime.errors import UserError

# Front-end tensors are float32 copies of float64 constants: they agree to rounding.
FRONTEND_TOLERANCE = 1e-5
STEM_INITS = ("fresh", "rgb-mean")


@dataclasses.dataclass
class Conversion:
    """A converted checkpoint: ``create_model(model_name, **model_config)`` takes ``variables``."""

    model_name: str
    model_config: dict[str, Any]
    variables: dict[str, Any]
    layout: str
    notes: dict[str, Any]


def model_family(model_name: str) -> str:
    module = get_spec(model_name).module
    if module is AudioConvNeXt:
        return "audio_convnext"
    if module is ImageNetConvNeXt:
        return "imagenet_convnext"
    return "pann"


def _flat_variables(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat_variables(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _listing(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")


def _variable_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return {path: tuple(leaf.shape) for path, leaf in _flat_variables(abstract).items()}


def _detect_model(layout: Layout, state_dict: Mapping[str, np.ndarray]) -> str:
    """The registered model a state dict of ``layout`` holds, from its depths and stem."""
    if layout.family == "pann":
        if "conv_block1.conv2.weight" in state_dict and "conv_block6.conv1.weight" in state_dict:
            return "cnn14"
        if state_dict["conv_block1.conv1.weight"].shape[-2:] == (5, 5) and "conv_block4.conv1.weight" in state_dict:
            return "cnn6"
        raise ConversionError("PANN-style state dict that is neither CNN14 nor CNN6; name the model with --model")
    block_prefix = "stages.2.blocks." if layout.name == "timm" else "stages.2."
    stage3_blocks = {k[len(block_prefix) :].split(".")[0] for k in state_dict if k.startswith(block_prefix)}
    size = {9: "convnext_tiny", 27: "convnext_small"}.get(len(stage3_blocks))
    if size is None:
        raise ConversionError(f"ConvNeXt with {len(stage3_blocks)} blocks in stage 3: neither Tiny (9) nor Small (27); name the model with --model")
    if layout.family == "imagenet_convnext":
        return size + "_imagenet"
    stem_kernel = tuple(state_dict["downsample_layers.0.0.weight"].shape[-2:])
    # 252x56 and 504x56 share a 4×4 kernel (they differ in stride): the released model is the default.
    stems = {v["kernel"]: name for name, v in reversed(list(STEM_VARIANTS.items()))}
    stem = stems.get(stem_kernel)
    if stem is None:
        raise ConversionError(f"audio ConvNeXt stem kernel {stem_kernel} matches none of the stems {sorted(STEM_VARIANTS)}")
    return size if stem == "252x56" else f"convnext_tiny_stem{stem}"


def _classifier_classes(layout: Layout, state_dict: Mapping[str, np.ndarray]) -> int | None:
    weight = state_dict.get(layout.classifier)
    return None if weight is None else int(weight.shape[0])


def _frontend_tensors(config: FrontendConfig) -> dict[str, np.ndarray]:
    """torchlibrosa's frozen tensors for ``config``: the windowed DFT basis as two Conv1d kernels
    (n_freqs, 1, n_fft) and the Slaney mel matrix melW (n_freqs, n_mels)."""
    n = np.arange(config.n_fft)
    # Built in float64 as torchlibrosa does — ω^(k·n) times a periodic Hann window — so the
    # float32 tensors come out bit-identical to the ones in the authors' and PANNs' checkpoints.
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / config.n_fft)
    basis = np.power(np.exp(-2j * np.pi / config.n_fft), np.outer(np.arange(config.n_freqs), n)) * window
    return {
        FRONTEND_KEYS[0]: basis.real.astype(np.float32)[:, None, :],
        FRONTEND_KEYS[1]: basis.imag.astype(np.float32)[:, None, :],
        FRONTEND_KEYS[2]: mel_filterbank(config),
    }


def check_frontend(state_dict: Mapping[str, np.ndarray], config: FrontendConfig, allow_mismatch: bool) -> dict[str, Any]:
    """Compares a checkpoint's front-end tensors with what our front end computes; returns the
    max |Δ| per tensor. A mismatch is an error unless ``allow_mismatch``."""
    expected = _frontend_tensors(config)
    report: dict[str, Any] = {}
    for key, want in expected.items():
        if key not in state_dict:
            report[key] = "absent"
            continue
        got = state_dict[key]
        if got.shape != want.shape:
            problem = f"front-end tensor {key} has shape {_shape_str(got.shape)}, but the model's front end ({config}) gives {_shape_str(want.shape)}"
        else:
            deviation = float(np.max(np.abs(got.astype(np.float64) - want)))
            report[key] = deviation
            if deviation <= FRONTEND_TOLERANCE:
                continue
            problem = f"front-end tensor {key} differs from the model's front end by up to {deviation:.3g}"
        if not allow_mismatch:
            raise ConversionError(problem + "; the checkpoint was trained on other front-end settings (--allow-frontend-mismatch converts anyway)")
        report[key] = f"MISMATCH: {problem}"
    return report


def _match(
    model_name: str,
    layout: Layout,
    state_dict: Mapping[str, np.ndarray],
    shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    skip: set[tuple[str, ...]] = frozenset(),
    ignored_keys: set[str] = frozenset(),
) -> dict[tuple[str, ...], np.ndarray]:
    """Flax variables (all of ``shapes`` but ``skip``) taken from ``state_dict``; one error listing
    every missing, wrong-shaped and unexpected tensor."""
    found, missing, wrong, used = {}, [], [], set()
    for path, shape in shapes.items():
        if path in skip:
            continue
        key = torch_key(layout, path[0], path[1:])
        want = torch_shape(shape, path[-1])
        if key not in state_dict:
            missing.append(f"{key} {_shape_str(want)}")
            continue
        used.add(key)
        tensor = state_dict[key]
        if tuple(tensor.shape) != want:
            wrong.append(f"{key} {_shape_str(tensor.shape)} in the file, {_shape_str(want)} expected")
            continue
        found[path] = to_flax_array(np.asarray(tensor, np.float32), path[-1])
    unexpected = sorted(
        k for k in state_dict if k not in used and k not in ignored_keys and not k.endswith("." + BATCH_COUNTER)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape: {_listing(wrong)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if problems:
        raise ConversionError(f"state dict ({layout.name} layout) does not fit {model_name}: " + "; ".join(problems))
    return found


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model_name: str | None = None,
    *,
    num_classes: int | None = None,
    stem_init: str = "fresh",
    seed: int = 0,
    allow_frontend_mismatch: bool = False,
    model_config: Mapping[str, Any] | None = None,
) -> Conversion:
    """Converts a PyTorch state dict (numpy arrays, see ``load_torch_state_dict``) to Flax variables.

    ``model_name`` defaults to the model the state dict holds. An ImageNet ConvNeXt state dict
    with an audio ConvNeXt ``model_name`` gives the paper's ImageNet initialisation: ``stem_init``
    'fresh' (the paper) or 'rgb-mean', fresh parts drawn with ``seed``. ``num_classes`` must be
    given when the checkpoint's classifier differs from the model's default. ``model_config``
    overrides other fields of the target model (e.g. ``depths``/``dims`` of a reduced model).
    """
    layout = detect_layout(state_dict)
    if layout is None:
        sample = _listing(sorted(state_dict), 3)
        raise ConversionError(
            f"unrecognised state dict ({len(state_dict)} tensors: {sample}); expected the authors' AudioSet ConvNeXt, "
            "a facebookresearch or timm ImageNet ConvNeXt, or a PANN CNN14/CNN6"
        )
    try:
        detected = _detect_model(layout, state_dict)
    except ConversionError:
        if model_name is None:
            raise
        # e.g. a reduced model (``model_config``) matches no registered size; the named model is
        # still checked tensor by tensor below.
        detected = layout.family
    model_name = model_name or detected
    try:
        family = model_family(model_name)
    except UserError as error:  # unknown model name
        raise ConversionError(str(error)) from None
    imagenet_init = layout.family == "imagenet_convnext" and family == "audio_convnext"
    if family != layout.family and not imagenet_init:
        raise ConversionError(
            f"the file holds {layout.description} ({detected}), not a {model_name} checkpoint; omit --model or pass --model {detected}"
        )
    if stem_init not in STEM_INITS:
        raise ConversionError(f"stem_init must be one of {STEM_INITS}, got {stem_init!r}")
    if stem_init != "fresh" and not imagenet_init:
        raise ConversionError("--stem-init applies only to an ImageNet checkpoint converted into an audio ConvNeXt")

    file_classes = _classifier_classes(layout, state_dict)
    model_config = dict(model_config or {})
    if num_classes is not None:
        model_config["num_classes"] = int(num_classes)
    model = create_model(model_name, **model_config)
    if not imagenet_init and file_classes is not None and file_classes != model.num_classes:
        if num_classes is None:
            raise ConversionError(
                f"the checkpoint has {file_classes} classes ({layout.classifier} {_shape_str(state_dict[layout.classifier].shape)}) "
                f"but {model_name} has {model.num_classes}; pass --num-classes {file_classes} to convert it with its classifier"
            )
        raise ConversionError(f"--num-classes {num_classes} does not match the checkpoint's {file_classes} classes ({layout.classifier})")

    notes: dict[str, Any] = {"layout": layout.name, "detected_model": detected}
    if layout.frontend_keys:
        notes["frontend_check"] = check_frontend(state_dict, model.frontend, allow_frontend_mismatch)
    shapes = _variable_shapes(model)
    if not imagenet_init:
        found = _match(model_name, layout, state_dict, shapes, ignored_keys=set(FRONTEND_KEYS))
        return Conversion(model_name, model_config, _nest(found), layout.name, notes)
    return _imagenet_init(model_name, model, model_config, layout, state_dict, shapes, stem_init, seed, notes)


def _imagenet_init(model_name, model, model_config, layout, state_dict, shapes, stem_init, seed, notes) -> Conversion:
    """The paper's initialisation: trunk + final LayerNorm from ImageNet, stem conv / bn0 / head fresh."""
    fresh_paths = {p for p in shapes if p[1] in ("bn0", "head") or p[1:3] == ("trunk", "stem_conv")}
    stem_key = torch_key(layout, "params", ("trunk", "stem_conv", "kernel"))
    stem_bias_key = torch_key(layout, "params", ("trunk", "stem_conv", "bias"))
    head_keys = {torch_key(layout, "params", ("head", leaf)) for leaf in ("kernel", "bias")}
    found = _match(model_name, layout, state_dict, shapes, skip=fresh_paths, ignored_keys={stem_key, stem_bias_key} | head_keys)
    initial = _flat_variables(jax.tree.map(np.asarray, init_variables(model, jax.random.key(seed))))
    if stem_init == "rgb-mean":
        want = torch_shape(shapes[("params", "trunk", "stem_conv", "kernel")], "kernel")
        rgb = state_dict.get(stem_key)
        if rgb is None or rgb.shape[0] != want[0] or rgb.shape[2:] != want[2:]:
            got = "absent" if rgb is None else _shape_str(rgb.shape)
            raise ConversionError(f"--stem-init rgb-mean needs an ImageNet stem kernel {stem_key} of shape ({want[0]}, 3, {want[2]}, {want[3]}), found {got}")
        mono = rgb.astype(np.float32).mean(axis=1, keepdims=True)
        found[("params", "trunk", "stem_conv", "kernel")] = to_flax_array(mono, "kernel")
        found[("params", "trunk", "stem_conv", "bias")] = np.asarray(state_dict[stem_bias_key], np.float32)
    fresh = sorted("/".join(p) for p in shapes if p not in found)
    found.update({p: initial[p] for p in shapes if p not in found})
    dropped = head_keys | ({stem_key, stem_bias_key} if stem_init == "fresh" else set())
    notes["imagenet_init"] = {"stem_init": stem_init, "seed": seed, "fresh": fresh, "dropped": sorted(dropped & set(state_dict))}
    return Conversion(model_name, model_config, _nest(found), layout.name, notes)


def to_torch_state_dict(model_name: str, variables: Mapping[str, Any], model_config: Mapping[str, Any] | None = None,
                        layout: str | None = None) -> dict[str, np.ndarray]:
    """Flax variables → a PyTorch state dict in ``layout`` (default: the model's original one, e.g.
    the authors' keys for the audio ConvNeXt), with the front-end tensors the authors' and PANNs'
    models carry and ``num_batches_tracked`` = 0 (Flax keeps no step counter)."""
    family = model_family(model_name)
    target = LAYOUTS[layout] if layout else NATIVE_LAYOUT[family]
    if target.family != family:
        raise ConversionError(f"layout {target.name!r} holds {target.family} models, not {model_name}")
    model = create_model(model_name, **dict(model_config or {}))
    flat = _flat_variables(variables)
    shapes = _variable_shapes(model)
    if {p: tuple(np.shape(v)) for p, v in flat.items()} != shapes:
        raise ConversionError(f"variables do not fit {model_name} with config {dict(model_config or {})}")
    state_dict: dict[str, np.ndarray] = {}
    if target.frontend_keys:
        state_dict.update(_frontend_tensors(model.frontend))
    for path, value in flat.items():
        key = torch_key(target, path[0], path[1:])
        state_dict[key] = to_torch_array(np.asarray(value, np.float32), path[-1])
        if path[0] == "batch_stats" and path[-1] == "mean":
            state_dict[key.removesuffix("running_mean") + BATCH_COUNTER] = np.zeros((), np.int64)
    return state_dict
