"""Model export for deployment without our training stack: self-describing ONNX files
(:mod:`.onnx`) and MONAI Bundles (:mod:`.bundle`). Submodules import torch/onnx/monai when
imported; this package file imports nothing.
"""
