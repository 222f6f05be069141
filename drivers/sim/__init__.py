"""Simulated twins: the world they share, and twins of things that are not on an I2C bus (sysfs, dock, NFC)."""
