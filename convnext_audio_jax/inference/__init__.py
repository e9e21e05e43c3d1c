"""Tagging and embedding audio files: windows, the tagger, output writers and the ONNX Runtime backend."""
