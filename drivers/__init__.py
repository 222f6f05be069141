"""Hardware drivers: one small Protocol per capability, each with a real implementation and a simulated twin.

This package never imports `agent` or `engines`; a hardware-in-the-loop script can drive it alone.
"""
