"""convnext-audio-jax: the audio ConvNeXt of Pellegrini et al. (Interspeech 2023) and PANN CNNs in JAX/Flax.

The subpackages are layers, each importing only from the layers before it (tests/test_layout.py checks):
``runtime`` → ``native`` → ``models`` → ``data`` → ``artifacts`` → ``convert`` → ``hub`` → ``evaluation`` →
``training`` → ``inference`` → ``export``; then the entry points ``cli`` (the ``convnext-audio`` command) and ``hear``
(the HEAR 2021 API, a module by its specification).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Modules that moved when the package was laid out by layer: the old names still import (the same module
# object), with a DeprecationWarning.
MOVED_MODULES = {
    "augment": "training.augment", "checkpoint": "artifacts.model_dir", "collectives": "runtime.collectives",
    "distill": "training.distill", "distributed": "runtime.distributed", "download": "hub.download",
    "embed_output": "inference.embed_output", "evaluate": "evaluation.evaluate", "forward": "runtime.forward",
    "frontend": "models.frontend", "host_memory": "runtime.host_memory", "metrics": "evaluation.metrics",
    "onnx_backend": "inference.onnx_backend", "predict": "evaluation.predict", "pretrained": "hub.pretrained",
    "sharding": "runtime.sharding", "tag_output": "inference.tag_output", "tagging": "inference.tagging",
    "teacher": "data.teacher", "torch_reference": "convert.torch_reference", "training.lock": "artifacts.lock",
    "windowing": "inference.windowing", "xla": "runtime.xla", "convert.cli": "hub.convert_command",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self):
        self._real_specs = {}  # old name → the module's own spec, between create_module and exec_module

    def find_spec(self, fullname, path, target=None):
        old = fullname.removeprefix(__name__ + ".")
        return importlib.util.spec_from_loader(fullname, self) if old in MOVED_MODULES else None

    def create_module(self, spec):
        new = f"{__name__}.{MOVED_MODULES[spec.name.removeprefix(__name__ + '.')]}"
        warnings.warn(f"{spec.name} is now {new}", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        # importlib sets the old name's spec on the module: exec_module puts the real one back. Keyed by the old
        # name, as two threads may import two old names at once.
        self._real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_specs.pop(module.__spec__.name)


sys.meta_path.insert(0, _MovedModules())  # before any finder that could still see an old file
