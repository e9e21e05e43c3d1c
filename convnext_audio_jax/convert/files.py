"""Reading and writing PyTorch state dicts as numpy arrays.

``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)`` (never executing pickled
code from a downloaded file) and need the ``[torch]`` extra; ``.safetensors`` files are read and written
with safetensors' numpy API, without torch. The
format is told by the file's first bytes, not its name, so a mislabelled or foreign file gets a
clear message.
"""

from __future__ import annotations

import os
import pathlib
import struct
from collections.abc import Mapping

import numpy as np

from convnext_audio_jax.data import labels as labels_lib
from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime.errors import UserError


class ConversionError(UserError):
    """A checkpoint that cannot be converted; the message is one line saying what was expected."""


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80  # legacy (non-zip) torch.save files start with a pickle PROTO opcode


def _sniff_format(path: pathlib.Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(_ZIP_MAGIC) or (head and head[0] == _PICKLE_PROTOCOL):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_size,) = struct.unpack("<Q", head[:8])
        if 0 < header_size <= path.stat().st_size - 8:
            return "safetensors"
        raise ConversionError(f"{path.name}: truncated safetensors file (header of {header_size} bytes, file of {path.stat().st_size})")
    raise ConversionError(
        f"{path.name} is not a checkpoint: expected a PyTorch .pth/.pt (torch.save) or a .safetensors file"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _import_torch(path: pathlib.Path, reading: bool):
    """torch, or a one-line ConversionError saying how to do without it."""
    try:
        import torch
    except ImportError:
        instead = ("convert the file to .safetensors where torch is installed (safetensors.torch.save_file)" if reading
                   else "write a .safetensors file instead")
        raise ConversionError(
            f"{path.name}: {'reading' if reading else 'writing'} a PyTorch .pth/.pt file needs torch, which is not "
            f'installed: install the [torch] extra (pip install "convnext-audio-jax[torch]") or {instead}'
        ) from None
    return torch


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    torch = _import_torch(path, reading=True)  # only .pth/.pt files need torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, … by case
        raise ConversionError(
            f"{path.name}: cannot read it as a PyTorch checkpoint (truncated or corrupt?): {_first_line(error)}"
        ) from None
    state_dict = _unwrap(loaded, path.name)
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path.name}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        value = value.detach().cpu()
        arrays[key] = (value.float() if value.is_floating_point() else value).numpy()
    return arrays


def _unwrap(loaded, name: str) -> Mapping:
    """The state dict inside a torch.save'd object: the object itself or its 'model'/'state_dict' entry."""
    if isinstance(loaded, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(loaded.get(wrapper), Mapping):
                return loaded[wrapper]
        if loaded and all(isinstance(k, str) for k in loaded):
            return loaded
    raise ConversionError(f"{name}: expected a state dict (or a dict holding one under 'model'), found {type(loaded).__name__}")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except Exception as error:  # SafetensorError on a damaged header or short data
        raise ConversionError(f"{path.name}: cannot read it as a safetensors file (truncated or corrupt?): {_first_line(error)}") from None
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()}


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict in a ``.pth``/``.pt``/``.safetensors`` file as numpy arrays (floats as float32)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint file not found: {path}")
    arrays = _read_torch(path) if _sniff_format(path) == "torch" else _read_safetensors(path)
    if not arrays:
        raise ConversionError(f"{path.name}: the state dict is empty")
    return arrays


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> pathlib.Path:
    """Writes a state dict as ``{"model": state_dict}`` with torch.save (``.pth``/``.pt``) or as
    ``.safetensors``, through a temporary file fsynced and renamed at the end."""
    path = pathlib.Path(path).absolute()
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ConversionError(f"output {path.name}: expected a .pth, .pt or .safetensors file name")
    torch = None if path.suffix == ".safetensors" else _import_torch(path, reading=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch.save / safetensors create the temporary file with open()'s mode (not mkstemp's 0600): the umask decides.
    with files.replacing(path) as staging:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, staging)
        else:
            torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}}, staging)
    return path


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from AudioSet's ``class_labels_indices.csv`` (``index,mid,display_name``)."""
    return list(labels_lib.read_class_labels(path).display_names)
