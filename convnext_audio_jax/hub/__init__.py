"""Where models come from: the pretrained registry, downloads, PyTorch conversion, and a model named by a path or a name."""
