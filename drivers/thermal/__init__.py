"""Thermal: zone temperatures from sysfs or a TMP117 on I2C, and the board fan through hwmon.

Each source reports {zone: °C or None}; None means the zone is offline (unreadable or implausible), which the
coordinator treats as a reason to fail safe, never as a crash.
"""

from drivers.thermal.fan import HwmonFan
from drivers.thermal.sysfs import SysfsThermal
from drivers.thermal.tmp117 import Tmp117

__all__ = ["HwmonFan", "SysfsThermal", "Tmp117"]
