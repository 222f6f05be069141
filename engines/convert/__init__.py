"""GGUF -> standard ONNX conversion of llama-family decoders: exact weight repacking, graph, cache."""

from engines.convert.cache import (
    CONVERTER_VERSION,
    DEFAULT_FLAVOUR,
    FLAVOURS,
    ConvertedModel,
    GraphFlavour,
    convert_gguf,
    ensure_converted,
    flavour_name,
    sha256_file,
)
from engines.convert.gguf_model import GgufModel, GgufTensor, LlamaConfig
from engines.convert.graph import LogitsMode, build_graph, past_names, present_names
from engines.convert.repack import BlockWeight, pack_int4, repack

__all__ = [
    "CONVERTER_VERSION",
    "DEFAULT_FLAVOUR",
    "FLAVOURS",
    "BlockWeight",
    "ConvertedModel",
    "GraphFlavour",
    "GgufModel",
    "GgufTensor",
    "LlamaConfig",
    "LogitsMode",
    "build_graph",
    "convert_gguf",
    "ensure_converted",
    "flavour_name",
    "pack_int4",
    "past_names",
    "present_names",
    "repack",
    "sha256_file",
]
