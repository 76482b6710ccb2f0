"""Model export for deployment without our training stack: self-describing ONNX files
(:mod:`.onnx`, imports torch) and their int8 version behind an agreement check
(:mod:`.quantize`, onnxruntime and numpy only). This package file imports nothing.
"""
