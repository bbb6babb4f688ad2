"""The fault switches' admin API, which the storefront serves to the admin page's panel (the web
gateway forwards `/api/admin/faults...` here, for admins only):

    GET /faults             200 {"processes": true, "services": {"identity": {...}, ...}}
    PUT /faults/{service}   200 {"decline_rate": 0.0, "latency_ms": 0, "paused": false,
                                 "crash_next": false}: that service's switches after the change

Each service of the shop (`SERVICES`, the storefront aside) has the same four switches:

    decline_rate  0.0 to 1.0  payments only: that fraction of authorizations is declined
    latency_ms    0 to 10000  added before each of the service's message handlers
    paused        true/false  the service's consumers stop fetching until it is false again
    crash_next    true/false  the service's process exits abruptly at its next message (once)

A PUT body is a JSON object with any of them; each value must have its type (no `"1"` for 1,
no `1` for true, no null) and lie in its range, or the answer is a 422 problem (RFC 9457), as it
is for an unknown field and for `decline_rate` on a service other than payments; a body that is
not JSON is a 400 problem; an unknown service a 404. `crash_next: true` while the shop runs in
one process is a 409 problem: the crash would stop all of it. The storefront knows the shop runs
as separate processes from `MSA_SHOP_PROCESSES=1`, which `msa shop --processes` sets.

The switches live on the bus (`framework.faults`, topic `msa.faults`), where every process of
the shop reads them; the services obey them when `MSA_FAULTS=1`, which `msa shop`,
`msa shop --processes`, compose and the k8s dev overlay set. Where the storefront has it off
(the k8s prod overlay), both routes answer 404: no switch is offered that nothing would obey.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from example_shop.common import PORTS, require_admin
from framework.bus import Bus
from framework.errors import MsaError
from framework.faults import FAULTS_TOPIC, MAX_LATENCY_MS, FaultSwitches, Switches
from framework.http import json_response, problem, read_json
from framework.service import ServiceSettings

__all__ = [
    "DECLINE_RATE",
    "PROCESSES_VARIABLE",
    "SERVICES",
    "FaultsAdmin",
    "FaultsChange",
    "runs_as_processes",
    "switches_view",
]

SERVICES: Final = tuple(name for name in PORTS if name != "storefront")
"""The services whose switches the admin page shows, in the shop's order."""
DECLINE_RATE: Final = "decline_rate"
"""The payments service's domain switch (`example_shop.payments.service.DECLINE_RATE`)."""
_DOMAIN_SWITCHES: Final = {DECLINE_RATE: "payments"}
"""Switches only one service has: switch -> that service."""
PROCESSES_VARIABLE = "MSA_SHOP_PROCESSES"
"""Set to 1 when every service runs as its own process (`msa shop --processes`)."""
ENABLED_VARIABLE = "MSA_FAULTS"
"""`framework.service.ServiceSettings.faults`: 1 where the services obey the switches (parsed
there: `FaultsAdmin` takes the storefront's settings, never the variable itself)."""
OFF = "fault injection is off on this deployment (the services obey it with MSA_FAULTS=1)"
ONE_PROCESS_CRASH = (
    "the shop runs in one process: a crash would stop all of it; run msa shop --processes"
)


class FaultsChange(BaseModel):
    """The body of `PUT /faults/{service}`: any of the four switches."""

    model_config = ConfigDict(extra="forbid", strict=True)

    decline_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    latency_ms: int = Field(default=0, ge=0, le=MAX_LATENCY_MS)
    paused: bool = False
    crash_next: bool = False


def switches_view(switches: Switches) -> dict[str, Any]:
    """A service's switches as the admin API shows them."""
    return {
        "decline_rate": switches.rate(DECLINE_RATE),
        "latency_ms": switches.latency_ms,
        "paused": switches.paused,
        "crash_next": switches.crash_armed,
    }


class FaultsAdmin:
    """The two routes' work, and the switches they read and write; the storefront owns one,
    starts it in `on_start` (after its bus) and stops it in `on_stop`."""

    def __init__(
        self,
        bus: Bus,
        settings: ServiceSettings,
        *,
        switches: FaultSwitches | None = None,
    ) -> None:
        """`settings`: the storefront's `ServiceSettings`, whose `faults` (`MSA_FAULTS`,
        parsed there) turns the routes on; `MSA_SHOP_PROCESSES` is read from their `env`
        (`runs_as_processes`)."""
        self.switches = switches if switches is not None else FaultSwitches(bus, topic=FAULTS_TOPIC)
        self.processes = runs_as_processes(settings.env)
        """Whether the services run as separate processes (so one may crash alone)."""
        self.enabled = settings.faults
        """Whether this deployment obeys the switches (the storefront's own `MSA_FAULTS`)."""

    async def start(self) -> None:
        if self.enabled:
            await self.switches.start()

    async def stop(self) -> None:
        if self.enabled:
            await self.switches.stop()

    def _off(self) -> web.Response | None:
        """The answer of both routes where fault injection is off."""
        if self.enabled:
            return None
        return problem(404, "Not Found", OFF)

    async def get(self, request: web.Request) -> web.Response:
        """`GET /faults`: every service's switches, and whether they run as processes."""
        require_admin(request)
        if (off := self._off()) is not None:
            return off
        return json_response(
            {
                "processes": self.processes,
                "services": {name: switches_view(self.switches.get(name)) for name in SERVICES},
            }
        )

    async def put(self, request: web.Request) -> web.Response:
        """`PUT /faults/{service}`: change some of a service's switches; answers them after."""
        require_admin(request)
        if (off := self._off()) is not None:
            return off
        service = request.match_info["service"]
        if service not in SERVICES:
            return problem(404, "Not Found", f"no service {service!r}; the services are {SERVICES}")
        change = await read_json(request, FaultsChange)
        given = change.model_fields_set
        for switch in given & set(_DOMAIN_SWITCHES):
            owner = _DOMAIN_SWITCHES[switch]
            if owner != service:
                return problem(
                    422,
                    "Unprocessable Content",
                    f"{switch} is a switch of {owner} only, not of {service}",
                )
        if change.crash_next and "crash_next" in given and not self.processes:
            return problem(409, "Conflict", ONE_PROCESS_CRASH)
        if not given:
            return json_response(switches_view(self.switches.get(service)))
        try:
            switches = await self.switches.set(
                service,
                latency_ms=change.latency_ms if "latency_ms" in given else None,
                paused=change.paused if "paused" in given else None,
                crash_next=change.crash_next if "crash_next" in given else None,
                rates={DECLINE_RATE: change.decline_rate} if DECLINE_RATE in given else None,
            )
        except MsaError as exc:
            return problem(
                503, "Service Unavailable", f"the switches could not be stored on the bus: {exc}"
            )
        return json_response(switches_view(switches))


def runs_as_processes(env: Mapping[str, str]) -> bool:
    """Whether `MSA_SHOP_PROCESSES` (`PROCESSES_VARIABLE`) says every service of the shop runs
    as its own process: 1, true, yes or on; anything else (unset too) means one process."""
    return env.get(PROCESSES_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")
