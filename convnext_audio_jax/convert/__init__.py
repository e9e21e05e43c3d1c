"""PyTorch → Flax checkpoint converter (``convnext-audio convert``, or ``python -m convert`` from a checkout), see docs/convert.md.

Library API::

    state_dict = load_torch_state_dict("convnext_tiny_471mAP.pth")      # numpy arrays, no pickled code run
    result = convert_state_dict(state_dict)                             # Conversion(model_name, model_config, variables, …)
    torch_sd = to_torch_state_dict(result.model_name, result.variables) # and back
"""

from convnext_audio_jax.convert.conversion import (
    Conversion,
    check_frontend,
    convert_state_dict,
    to_torch_state_dict,
)
from convnext_audio_jax.convert.files import (
    ConversionError,
    load_torch_state_dict,
    read_labels,
    save_torch_state_dict,
)
from convnext_audio_jax.convert.layouts import LAYOUTS, detect_layout
from convnext_audio_jax.data.labels import read_class_labels

__all__ = [
    "LAYOUTS",
    "Conversion",
    "ConversionError",
    "check_frontend",
    "convert_state_dict",
    "detect_layout",
    "load_torch_state_dict",
    "read_class_labels",
    "read_labels",
    "save_torch_state_dict",
    "to_torch_state_dict",
]
