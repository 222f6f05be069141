"""Thermal sources, fan and power mode drivers against their twins."""
