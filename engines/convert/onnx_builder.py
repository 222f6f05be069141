"""The node-and-initializer accumulator both converters build their graphs with."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import NodeProto, TensorProto, helper, numpy_helper

from engines.base import ProgressFn
from engines.convert.external import ExternalDataWriter


class OnnxBuilder:
    """Accumulates nodes and initializers; large weights go straight to the external-data writer."""

    def __init__(self, writer: ExternalDataWriter, progress: ProgressFn | None, total: int, stage: str) -> None:
        self.nodes: list[NodeProto] = []
        self.inits: list[TensorProto] = []
        self._writer = writer
        self._progress = progress
        self._stage = stage
        self._done = 0
        self._total = total
        self._count = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def op(self, op_type: str, inputs: list[str], hint: str, *, out: str | None = None, **attrs: Any) -> str:
        """Append one node and return the name of its (single) output."""
        self._count += 1
        name = f"{hint}/{op_type}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out or name], name=name, **attrs))
        return out or name

    def const(self, value: npt.NDArray[Any], hint: str = "const") -> str:
        """A small inline constant (shapes, axes, scalars), deduplicated: fusions only check values."""
        key = (value.dtype.str, value.tobytes(), value.shape)
        if key not in self._consts:
            name = f"{hint}_{len(self._consts)}"
            self.inits.append(numpy_helper.from_array(value, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, *values: int) -> str:
        """An inline int64 vector (shapes, axes, slice bounds)."""
        return self.const(np.array(values, dtype=np.int64), "i64")

    def tick(self) -> None:
        """Report one more source tensor converted."""
        self._done += 1
        if self._progress is not None:
            self._progress(self._stage, self._done, self._total)
