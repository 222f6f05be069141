"""The Thox agent: one asyncio process serving the inference and cluster APIs and owning the box's hardware."""

__version__ = "0.1.0"
