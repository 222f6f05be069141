"""Runtime around an executor: the scheduler (continuous batching), KV bookkeeping and the sampler."""

from __future__ import annotations

from engines.runtime.sampler import Sampler

__all__ = ["Sampler"]
