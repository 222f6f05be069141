"""Power: USB-PD sink controllers (STUSB4500, TPS25750) over a shared PDO/RDO codec, and the INA226 power monitor.

`pdo` is the pure USB PD codec (PDOs, RDOs, message headers, choosing an offer); `stusb4500`, `tps25750` and
`ina226` are the async drivers, each checked against its register-level twin in `drivers.i2c.chips`; the two PD
drivers share `pd_sink`. Submodules are imported where used, so importing one driver does not load the others.
"""
