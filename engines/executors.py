"""The executor registry: an engine host runs the executor its model is configured for, chosen by name.

`onnxruntime` (CPU, every machine) is registered here; a GPU executor registers the same way. A factory imports
its runtime only when called, so a machine without that runtime can still list and refuse it clearly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engines.base import EngineError, Executor

if TYPE_CHECKING:  # importing the converter costs a second (onnx); naming executors must stay cheap
    from engines.convert import ConvertedModel


@dataclass(frozen=True)
class ExecutorOptions:
    """What every executor is built with: its share of the CPU, the context and how many sequences at once."""

    threads: int
    max_context: int
    max_batch: int


ExecutorFactory = Callable[["ConvertedModel", ExecutorOptions], Executor]


def _onnxruntime(model: ConvertedModel, options: ExecutorOptions) -> Executor:
    from engines.onnxruntime import OrtExecutor

    return OrtExecutor(model, options.threads, max_context=options.max_context, max_batch=options.max_batch)


_FACTORIES: dict[str, ExecutorFactory] = {"onnxruntime": _onnxruntime}


def register(name: str, factory: ExecutorFactory) -> None:
    """Make an executor available under `name` (EngineError if the name is taken)."""
    if name in _FACTORIES:
        raise EngineError(f"an executor named {name!r} is already registered")
    _FACTORIES[name] = factory


def names() -> list[str]:
    """The executors an engine host can run, by name."""
    return sorted(_FACTORIES)


def create(name: str, model: ConvertedModel, options: ExecutorOptions) -> Executor:
    """Blocking (loads the model): the executor `name` for `model`; EngineError naming the known ones otherwise."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise EngineError(f"no executor named {name!r}; this engine host has {', '.join(names())}")
    return factory(model, options)
