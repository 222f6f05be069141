"""I2C: the blocking smbus2 transport behind one worker thread per bus, and the fake bus the simulated chips sit on.

`device` holds the lifecycle the I2C chip drivers share.
"""

from drivers.i2c.transport import I2cAddress, I2cBus, parse_i2c_address

__all__ = ["I2cAddress", "I2cBus", "parse_i2c_address"]
