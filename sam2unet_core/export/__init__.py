"""Model export for deployment without our training stack: self-describing ONNX files
(:mod:`.onnx`), their int8 version behind an agreement check (:mod:`.quantize`,
onnxruntime and numpy only) and MONAI Bundles (:mod:`.bundle`). Submodules import
torch/onnx/monai when imported; this package file imports nothing.
"""
