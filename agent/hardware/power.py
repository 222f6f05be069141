"""Power contracts on the dock port: negotiate with the module's USB-PD source, report the contract record.

The record (research/hardware.md section 2) joins what the PD controller says (source PDOs, the selected object,
the RDO the source accepted) with what the power monitor measures on the bus, so an operator sees both what was
agreed and what is flowing. On shutdown every port goes back to the 5 V default contract: the safe state for
whatever is plugged in next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.errors import ConflictError, HardwareUnavailableError, NotFoundError, UnprocessableError
from agent.hardware.coordinator import Coordinator
from drivers.base import (
    Contract,
    DriverError,
    DriverState,
    NegotiationError,
    NotAttachedError,
    PdController,
    Pdo,
    PowerSample,
)
from drivers.power.pdo import choose_pdo

log = structlog.get_logger("agent.hardware.power")


@dataclass(frozen=True)
class ContractRequest:
    """What a caller asks for: an object position, or a voltage (with an optional current)."""

    pdo_index: int | None = None
    voltage_mv: int | None = None
    current_ma: int | None = None


@dataclass
class PowerPort:
    """One dock port: its PD controller and, where fitted, the monitor on its bus."""

    name: str
    pd: PdController
    monitor: Coordinator[PowerSample] | None = None
    negotiated_at: float | None = None


def _pdo_record(pdo: Pdo) -> dict[str, Any]:
    record: dict[str, Any] = {"index": pdo.index, "type": pdo.kind}
    if pdo.min_mv == pdo.max_mv:
        record["mV"] = pdo.max_mv
    else:
        record.update(min_mV=pdo.min_mv, max_mV=pdo.max_mv)
    if pdo.max_ma is not None:
        record["mA"] = pdo.max_ma
    if pdo.max_mw is not None:
        record["mW"] = pdo.max_mw
    return record


class PowerContracts:
    """Negotiates and reports the contract on each port; one negotiation at a time per port."""

    def __init__(self, ports: list[PowerPort], peer_module: Callable[[], str | None]) -> None:
        self.ports = {port.name: port for port in ports}
        self._peer_module = peer_module
        self._locks = {port.name: asyncio.Lock() for port in ports}

    def _port(self, name: str) -> PowerPort:
        port = self.ports.get(name)
        if port is None:
            known = ", ".join(sorted(self.ports)) or "none (no PD controller is configured)"
            raise NotFoundError(f"no power port named {name!r}; ports: {known}", code="port_not_found")
        return port

    async def negotiate(self, port_name: str, request: ContractRequest) -> dict[str, Any]:
        """Negotiate a contract satisfying `request`; returns the contract record."""
        port = self._port(port_name)
        async with self._locks[port.name]:
            try:
                await self._ensure_open(port)
                pdos = await port.pd.source_caps()
                pdo = self._select(pdos, request)
                operating_ma = request.current_ma if request.current_ma is not None else pdo.max_ma
                contract = await port.pd.request(pdo.index, operating_ma)
            except NotAttachedError as exc:
                raise ConflictError(
                    f"no module is docked on port {port.name!r}: {exc}", code="no_module_docked"
                ) from exc
            except NegotiationError as exc:
                log.warning("power_contract_failed", port=port.name, error=str(exc))
                raise HardwareUnavailableError(
                    f"the module on port {port.name!r} did not grant the contract: {exc}", code="negotiation_failed"
                ) from exc
            except DriverError as exc:
                raise HardwareUnavailableError(f"PD controller {port.pd.name} failed: {exc}") from exc
            port.negotiated_at = time.time()
            record = self._record(port, contract)
            log.info(
                "power_contract_negotiated",
                port=port.name,
                pdo=pdo.index,
                mv=pdo.max_mv,
                operating_ma=operating_ma,
                state=contract.state,
            )
            return record

    @staticmethod
    def _select(pdos: tuple[Pdo, ...], request: ContractRequest) -> Pdo:
        offered = ", ".join(f"#{p.index} {p.kind} {p.min_mv}-{p.max_mv} mV {p.max_ma or '-'} mA" for p in pdos)
        if request.pdo_index is not None:
            for pdo in pdos:
                if pdo.index == request.pdo_index:
                    if request.current_ma is not None and pdo.max_ma is not None and request.current_ma > pdo.max_ma:
                        raise UnprocessableError(
                            f"PDO #{pdo.index} offers at most {pdo.max_ma} mA, {request.current_ma} mA requested; "
                            f"offered: {offered}",
                            param="current_ma",
                            code="no_matching_pdo",
                        )
                    return pdo
            raise UnprocessableError(
                f"the source offers no PDO #{request.pdo_index}; offered: {offered}",
                param="pdo_index",
                code="no_matching_pdo",
            )
        chosen = choose_pdo(
            pdos, min_mv=request.voltage_mv, max_mv=request.voltage_mv, min_ma=request.current_ma, kinds=("fixed",)
        )  # both controllers request fixed supplies only
        if chosen is None:
            current = f" at {request.current_ma} mA" if request.current_ma is not None else ""
            raise UnprocessableError(
                f"no offered PDO provides {request.voltage_mv} mV{current}; offered: {offered}",
                param="voltage_mv",
                code="no_matching_pdo",
            )
        return chosen

    async def _ensure_open(self, port: PowerPort) -> None:
        if port.pd.state is not DriverState.OPEN:
            await port.pd.open()

    async def contracts(self) -> list[dict[str, Any]]:
        """The current contract record of every port (a failing controller is reported, not raised)."""
        records = []
        for port in self.ports.values():
            async with self._locks[port.name]:
                try:
                    await self._ensure_open(port)
                    contract = await port.pd.contract()
                except DriverError as exc:
                    records.append(
                        {
                            "port": port.name,
                            "controller": port.pd.controller,
                            "state": "failed",
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
                    continue
                records.append(self._record(port, contract))
        return records

    async def restore_defaults(self) -> None:
        """Return every attached port to the 5 V default contract (shutdown's safe state)."""
        for port in self.ports.values():
            async with self._locks[port.name]:
                if port.pd.state is not DriverState.OPEN:
                    continue
                try:
                    if await port.pd.attached():
                        contract = await port.pd.reset_to_default()
                        log.info(
                            "power_contract_default_restored",
                            port=port.name,
                            state=contract.state,
                            mv=contract.selected.max_mv if contract.selected else None,
                        )
                except DriverError as exc:
                    log.error("power_contract_default_failed", port=port.name, error=str(exc))
                port.negotiated_at = None

    def _record(self, port: PowerPort, contract: Contract) -> dict[str, Any]:
        selected = contract.selected
        rdo = contract.rdo
        operating_ma = rdo.operating_ma if rdo is not None else None
        sample = port.monitor.data if port.monitor is not None and port.monitor.available else None
        return {
            "port": port.name,
            "peer_module_id": self._peer_module() if contract.state != "detached" else None,
            "role": "sink",
            "controller": port.pd.controller,
            "state": contract.state,
            "source_pdos": [_pdo_record(p) for p in contract.source_pdos],
            "selected": None
            if selected is None
            else {
                "pdo_index": selected.index,
                "type": selected.kind,
                "voltage_mV": selected.max_mv,
                "current_mA": operating_ma if operating_ma is not None else selected.max_ma,
                "power_mW": selected.max_mv * (operating_ma or selected.max_ma or 0) // 1000,
            },
            "rdo": None
            if rdo is None
            else {
                "object_position": rdo.object_position,
                "operating_mA": rdo.operating_ma,
                "max_mA": rdo.max_ma,
                "capability_mismatch": rdo.capability_mismatch,
                "raw": f"0x{rdo.raw:08x}",
            },
            "negotiated_at": None
            if port.negotiated_at is None
            else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(port.negotiated_at)),
            "measured": None
            if sample is None
            else {
                "bus_mV": round(sample.bus_mv, 1),
                "current_mA": round(sample.current_ma, 1),
                "power_mW": round(sample.power_mw, 1),
            },
            "budget_mW_allocated": None
            if selected is None or operating_ma is None
            else selected.max_mv * operating_ma // 1000,
        }
