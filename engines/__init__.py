"""Inference engines: GGUF -> ONNX conversion, text processing, executors and the engine host process.

This package never imports `agent` or `drivers`; a benchmark or script can drive it alone.
"""
