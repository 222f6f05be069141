"""Fault suite: real agents under real faults (a killed engine host, a full disk, an agent killed mid-pull)."""
