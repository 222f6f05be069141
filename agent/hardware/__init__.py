"""Hardware coordination and policy over drivers: pollers, the thermal governor, power contracts, the dock."""
