"""Power contract routes of the cluster API: negotiate with the docked module, list contracts."""

from __future__ import annotations

from aiohttp import web

from agent.api.body import parse_body, read_json_body
from agent.api.cluster.protocol import ContractRequestBody
from agent.hardware.manager import HardwareManager
from agent.hardware.power import ContractRequest

HARDWARE_KEY = web.AppKey("hardware", HardwareManager)


async def list_contracts(request: web.Request) -> web.Response:
    """GET /v1/power/contract: the contract on every port."""
    contracts = await request.app[HARDWARE_KEY].power.contracts()
    return web.json_response({"object": "list", "data": contracts})


async def negotiate_contract(request: web.Request) -> web.Response:
    """POST /v1/power/contract: 200 with the contract, 409 if nothing is docked, 422 if no PDO satisfies it."""
    body = parse_body(ContractRequestBody, await read_json_body(request))
    record = await request.app[HARDWARE_KEY].power.negotiate(
        body.port, ContractRequest(pdo_index=body.pdo_index, voltage_mv=body.voltage_mv, current_ma=body.current_ma)
    )
    return web.json_response(record)


def setup_routes(app: web.Application) -> None:
    """Register the power routes."""
    app.router.add_get("/v1/power/contract", list_contracts)
    app.router.add_post("/v1/power/contract", negotiate_contract)
