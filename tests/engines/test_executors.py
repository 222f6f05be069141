"""The executor registry: executors by name, a clear refusal for an unknown one."""

from __future__ import annotations

import pytest

from engines import executors
from engines.base import EngineError
from engines.convert import ConvertedModel
from engines.onnxruntime import OrtExecutor


def test_onnxruntime_is_registered_and_builds_the_cpu_executor(fused_last: ConvertedModel) -> None:
    assert "onnxruntime" in executors.names()
    executor = executors.create(
        "onnxruntime", fused_last, executors.ExecutorOptions(threads=1, max_context=128, max_batch=2)
    )
    try:
        assert isinstance(executor, OrtExecutor)
        assert (executor.max_context, executor.max_batch) == (128, 2)
    finally:
        executor.close()


def test_an_unknown_executor_is_refused_naming_the_known_ones(fused_last: ConvertedModel) -> None:
    with pytest.raises(EngineError, match="no executor named 'cuda-magic'; this engine host has .*onnxruntime"):
        executors.create("cuda-magic", fused_last, executors.ExecutorOptions(threads=1, max_context=64, max_batch=1))
    with pytest.raises(EngineError, match="already registered"):
        executors.register("onnxruntime", lambda model, options: OrtExecutor(model, options.threads))
