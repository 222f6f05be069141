"""Models: what ships with the agent, what is installed in the store, and which one is the default."""

from agent.models.bundled import BUNDLED_MODELS, BundledModel
from agent.models.store import InstalledModel, ModelStore, ModelStoreError

__all__ = ["BUNDLED_MODELS", "BundledModel", "InstalledModel", "ModelStore", "ModelStoreError"]
