"""Request bodies of the cluster API (port 5381)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContractRequestBody(_Body):
    """POST /v1/power/contract: a PDO by index, or a voltage with an optional current."""

    port: str = "dock"
    pdo_index: int | None = Field(None, ge=1, le=7)
    voltage_mv: int | None = Field(None, ge=3000, le=48000)
    current_ma: int | None = Field(None, ge=0, le=5000)

    @model_validator(mode="after")
    def _one_way(self) -> ContractRequestBody:
        if (self.pdo_index is None) == (self.voltage_mv is None):
            raise ValueError("give either pdo_index, or voltage_mv (with an optional current_ma)")
        return self


class SimPdo(_Body):
    """One source offer of a simulated module: fixed (mv, ma) or PPS (min_mv, max_mv, ma)."""

    type: Literal["fixed", "pps"] = "fixed"
    mv: int | None = Field(None, ge=5000, le=48000)
    min_mv: int | None = Field(None, ge=3300, le=21000)
    max_mv: int | None = Field(None, ge=3300, le=21000)
    ma: int = Field(ge=0, le=5000)

    @model_validator(mode="after")
    def _complete(self) -> SimPdo:
        if self.type == "fixed" and self.mv is None:
            raise ValueError("a fixed PDO needs mv")
        if self.type == "pps" and (self.min_mv is None or self.max_mv is None or self.min_mv > self.max_mv):
            raise ValueError("a pps PDO needs min_mv <= max_mv")
        return self


class SimOffer(_Body):
    """The join offer a simulated module's NFC tag carries."""

    node_id: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(min_length=1, max_length=100)
    token: str = Field("", max_length=200)  # a cluster join token is 127 characters
    expires_at: int = Field(0, ge=0)


class SimModuleBody(_Body):
    """POST /v1/sim/modules: stack a module on the simulated box."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    pdos: list[SimPdo] | None = Field(None, min_length=1, max_length=7)
    offer: SimOffer | None = None


class SimThermalBody(_Body):
    """PUT /v1/sim/thermal: air temperature, how fast zones follow it, zones held at a value."""

    ambient_c: float | None = Field(None, ge=-40, le=125)
    time_constant_s: float | None = Field(None, ge=0, le=3600)
    pin: dict[str, float | None] | None = None


class SimFaultBody(_Body):
    """POST /v1/sim/faults: inject a fault kind at a rate into one twin."""

    target: str = Field(min_length=1, description="i2c-1, i2c-7[@0xADDR], sysfs:ZONE, nfc, dock, serial")
    kind: str = Field(min_length=1)
    rate: float = Field(1.0, ge=0, le=1)


class TokenRequestBody(_Body):
    """POST /v1/cluster/tokens: how long the token may be used (a person typing it: an hour by default)."""

    ttl_seconds: float = Field(3600, gt=0, le=7 * 24 * 3600)


class JoinRequestBody(_Body):
    """POST /v1/cluster/join: the token and the peer address (host or host:port) of a box in that cluster;
    without a server, one is looked for by mDNS."""

    token: str = Field(min_length=1, max_length=512)
    server: str | None = Field(None, min_length=1, max_length=300)


_MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_NODE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class LoadOptions(_Body):
    """How a placed model is served."""

    context_length: int | None = Field(None, ge=64, le=1_048_576)


class ModelLoadBody(_Body):
    """POST /v1/models/load: serve a model on `replicas` boxes (only on `nodes` when given)."""

    model: str = Field(pattern=_MODEL_ID)
    options: LoadOptions = Field(default_factory=LoadOptions)
    replicas: int = Field(1, ge=1, le=16)
    nodes: list[Annotated[str, Field(pattern=_NODE_ID)]] | None = Field(None, min_length=1, max_length=16)
    wait: bool = True
    timeout_seconds: float = Field(300.0, gt=0, le=3600)


class ModelUnloadBody(_Body):
    """POST /v1/models/unload: stop serving a placed model everywhere."""

    model: str = Field(pattern=_MODEL_ID)


class ModelPullBody(_Body):
    """POST /v1/models/pull: copy a model into the stores of boxes that lack it (or of the `nodes` named)."""

    model: str = Field(pattern=_MODEL_ID)
    nodes: list[Annotated[str, Field(pattern=_NODE_ID)]] | None = Field(None, min_length=1, max_length=16)
    stream: bool = True
    timeout_seconds: float = Field(1800.0, gt=0, le=86400)
