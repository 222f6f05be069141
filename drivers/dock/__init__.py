"""The magnetic dock switch: the debouncing state machine (pure) and the libgpiod 2 driver (drivers.dock.gpio).

`drivers.dock.gpio` is not imported here: it needs the gpiod package, which only installs on Linux, while the
debouncer (also used by the sim twin) does not.
"""

from drivers.dock.debounce import DEFAULT_CONFIRM, DEFAULT_DEBOUNCE, DebouncePump, Debouncer

__all__ = ["DEFAULT_CONFIRM", "DEFAULT_DEBOUNCE", "DebouncePump", "Debouncer"]
