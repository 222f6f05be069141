"""Datasheet-faithful models of I2C chips for FakeSMBus: register files, wire byte order, event sequences."""
