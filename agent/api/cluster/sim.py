"""The simulated world's control API (`/v1/sim/...` on 5381), mounted in the sim profile only.

Tests and people drive scenarios through it: stack and unstack modules, change the air temperature, inject faults
into any twin. It changes the world, never the agent: the agent learns of every change through its drivers, exactly
as it would from real hardware.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent.api.body import parse_body, read_json_body
from agent.api.cluster.power import HARDWARE_KEY
from agent.api.cluster.protocol import SimFaultBody, SimModuleBody, SimThermalBody
from agent.errors import HardwareUnavailableError, InvalidRequestError, NotFoundError
from drivers.base import JoinOffer
from drivers.power.pdo import decode_pdo, encode_fixed_pdo, encode_pps_apdo
from drivers.sim.board import SimBoard
from drivers.sim.nfc import SimNfc
from drivers.sim.world import DEFAULT_PDOS, SimModule

# A reader held to the box waits this long for the antenna's next presenting window.
TAP_WAIT_SECONDS = 5.0


def _board(request: web.Request) -> SimBoard:
    board = request.app[HARDWARE_KEY].board
    if board is None:
        raise HardwareUnavailableError("the simulated board is not running yet")
    return board


async def world(request: web.Request) -> web.Response:
    """GET /v1/sim/world: the simulated world's state."""
    board = _board(request)
    return web.json_response({**board.world.snapshot(), "faults": board.fault_summary()})


async def stack_module(request: web.Request) -> web.Response:
    """POST /v1/sim/modules: put a module on top of the stack (201)."""
    body = parse_body(SimModuleBody, await read_json_body(request))
    if body.pdos is None:
        pdos = tuple(encode_fixed_pdo(mv, ma) for mv, ma in DEFAULT_PDOS)
    else:
        words = []
        for pdo in body.pdos:
            if pdo.type == "fixed" and pdo.mv is not None:
                words.append(encode_fixed_pdo(pdo.mv, pdo.ma))
            elif pdo.min_mv is not None and pdo.max_mv is not None:  # the body model guarantees one or the other
                words.append(encode_pps_apdo(pdo.min_mv, pdo.max_mv, pdo.ma))
        if _first_is_not_5v(words):
            raise InvalidRequestError("the first PDO of a USB-PD source must be fixed 5 V", param="pdos[0]")
        pdos = tuple(words)
    offer = body.offer
    join_offer = (
        JoinOffer(node_id=offer.node_id, endpoint=offer.endpoint, token=offer.token, expires_at=offer.expires_at)
        if offer
        else JoinOffer(body.id, f"{body.id}.local:5381")
    )
    try:
        _board(request).world.stack(SimModule(body.id, pdos, join_offer))
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="id", code="module_exists") from None
    return web.json_response(_board(request).world.snapshot(), status=201)


def _first_is_not_5v(words: list[int]) -> bool:
    """USB-PD requires object 1 to be vSafe5V fixed."""
    first = decode_pdo(1, words[0])
    return first.kind != "fixed" or first.max_mv != 5000


async def unstack_module(request: web.Request) -> web.Response:
    """DELETE /v1/sim/modules/{id}: lift a module (and everything above it) off the stack."""
    module_id = request.match_info["module_id"]
    try:
        _board(request).world.unstack(module_id)
    except KeyError:
        raise NotFoundError(f"no module {module_id!r} is stacked", code="module_not_found") from None
    return web.json_response(_board(request).world.snapshot())


async def set_thermal(request: web.Request) -> web.Response:
    """PUT /v1/sim/thermal: ambient temperature, time constant, pinned zones."""
    body = parse_body(SimThermalBody, await read_json_body(request))
    sim_world = _board(request).world
    for zone in body.pin or {}:
        if zone not in sim_world.zones:
            raise InvalidRequestError(
                f"unknown zone {zone!r}; zones: {', '.join(sim_world.zones)}", param=f"pin.{zone}"
            )
    sim_world.set_thermal(ambient_c=body.ambient_c, time_constant_s=body.time_constant_s)
    for zone, celsius in (body.pin or {}).items():
        sim_world.pin(zone, celsius)
    return web.json_response(sim_world.snapshot())


async def tap_nfc(request: web.Request) -> web.Response:
    """POST /v1/sim/nfc/tap: hold a simulated reader to the box; answers the join offer its antenna presents."""
    nfc = request.app[HARDWARE_KEY].drivers.nfc
    if not isinstance(nfc, SimNfc):
        raise HardwareUnavailableError("this box has no simulated NFC antenna")
    offer = await nfc.tap(timeout=TAP_WAIT_SECONDS)
    if offer is None:
        raise NotFoundError(f"the box presented no join offer within {TAP_WAIT_SECONDS:.0f} s", code="no_offer")
    return web.json_response(
        {"node_id": offer.node_id, "endpoint": offer.endpoint, "token": offer.token, "expires_at": offer.expires_at}
    )


async def inject_fault(request: web.Request) -> web.Response:
    """POST /v1/sim/faults: start injecting a fault into one twin."""
    body = parse_body(SimFaultBody, await read_json_body(request))
    try:  # some twins write files to break themselves (a sysfs zone): off the loop
        await asyncio.to_thread(_board(request).inject, body.target, body.kind, body.rate)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="target" if "target" in str(exc) else "kind") from None
    return web.json_response({"faults": _board(request).fault_summary()}, status=201)


async def clear_faults(request: web.Request) -> web.Response:
    """DELETE /v1/sim/faults: every twin behaves again."""
    await asyncio.to_thread(_board(request).clear_faults)
    return web.json_response({"faults": _board(request).fault_summary()})


def setup_routes(app: web.Application) -> None:
    """Register the sim routes."""
    app.router.add_get("/v1/sim/world", world)
    app.router.add_post("/v1/sim/modules", stack_module)
    app.router.add_delete("/v1/sim/modules/{module_id}", unstack_module)
    app.router.add_put("/v1/sim/thermal", set_thermal)
    app.router.add_post("/v1/sim/nfc/tap", tap_nfc)
    app.router.add_post("/v1/sim/faults", inject_fault)
    app.router.add_delete("/v1/sim/faults", clear_faults)
