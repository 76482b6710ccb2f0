"""Model export for deployment without our training stack: self-describing ONNX files
(:mod:`.onnx`). Submodules import torch/onnx when imported; this package file imports nothing.
"""
