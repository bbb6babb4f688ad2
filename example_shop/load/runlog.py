"""The run log: what the locustfile records for `msa shop load`, and how the report reads it.

Locust runs in a process of its own. When `MSA_LOAD_RUN_LOG` names a file, the locustfile appends
one JSON line per event to it, and `msa shop load` reads the file once Locust has exited:

    {"event": "start", "at": 1764650000.12}          the test started: users are being spawned
    {"event": "request", "at": 1764650000.13, "ms": 12.5, "method": "GET",
     "name": "/api/categories", "status": 200}       one request: sent at `at`, answered `ms` later
    {"event": "request", ..., "status": 0}           no answer (refused, reset, timed out)
    {"event": "request", ..., "status": 503, "circuit_open": true}
    {"event": "request", ..., "status": 202, "order_id": "01J..."}   a checkout that placed an order
    {"event": "stopping", "at": ..., "users": 20}    the run ends; the users that were running

`at` is the wall clock (seconds since the epoch), the same one Locust times requests with. The
lines are this module's alone: the locustfile imports it, never the other way round, and it stays
light (Locust imports the locustfile before its run clock starts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

__all__ = [
    "BUYER_EMAIL",
    "BUYER_PASSWORD",
    "CHECKOUT",
    "RUN_LOG_ENV",
    "RequestRecord",
    "RunLog",
    "RunLogWriter",
    "is_circuit_open",
]

RUN_LOG_ENV = "MSA_LOAD_RUN_LOG"
"""The file the locustfile appends the run log to (none: it records nothing)."""

BUYER_EMAIL = "demo@shop.test"
BUYER_PASSWORD = "demo-password-123"
"""The account every buyer signs in with: identity's seeded demo customer
(`example_shop.identity.service.DEMO_EMAIL`), written out because importing the service would
add a second to Locust's start. `msa shop load` signs in with it too, to read the orders placed."""

CHECKOUT = "/api/orders (checkout)"
"""The name of the checkout request, in the log and in the report."""


def is_circuit_open(status: int, body: bytes) -> bool:
    """Whether an answer is the gateway's "circuit open": a 503 problem whose detail is
    `circuit open for upstream <name>` (`framework.resilience.upstreams.UpstreamPool.send`)."""
    if status != 503:
        return False
    try:
        problem = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    detail = problem.get("detail") if isinstance(problem, dict) else None
    return isinstance(detail, str) and detail.startswith("circuit open")


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestRecord:
    """One request of the run."""

    at: float
    """When it was sent (seconds since the epoch)."""
    ms: float
    """How long its answer took (or its failure, when `status` is 0)."""
    method: str
    name: str
    status: int
    """The answer's status; 0 when there was no answer."""
    circuit_open: bool = False
    order_id: str | None = None
    """The order a 202 checkout answer placed."""

    @property
    def answered_at(self) -> float:
        return self.at + self.ms / 1000


@dataclass(kw_only=True)
class RunLog:
    """A run log as read back."""

    started_at: float | None = None
    """When Locust started the test (None: it never did)."""
    users_running: int | None = None
    """How many users were running when the test stopped."""
    requests: list[RequestRecord] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> RunLog:
        """The log in `path`; a last line cut short (Locust killed mid-write) is left out."""
        log = cls()
        with path.open("rb") as lines:
            for line in lines:
                try:
                    event: dict[str, Any] = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                kind = event.pop("event")
                if kind == "request":
                    log.requests.append(RequestRecord(**event))
                elif kind == "start":
                    log.started_at = event["at"]
                elif kind == "stopping":
                    log.users_running = event["users"]
        return log


class RunLogWriter:
    """Appends the run log (in the Locust process)."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO = path.open("ab")

    @classmethod
    def from_env(cls) -> RunLogWriter | None:
        path = os.environ.get(RUN_LOG_ENV)
        return cls(Path(path)) if path else None

    def request(self, record: RequestRecord) -> None:
        line: dict[str, Any] = {
            "event": "request",
            "at": record.at,
            "ms": record.ms,
            "method": record.method,
            "name": record.name,
            "status": record.status,
        }
        if record.circuit_open:
            line["circuit_open"] = True
        if record.order_id is not None:
            line["order_id"] = record.order_id
        self._file.write(orjson.dumps(line) + b"\n")

    def started(self, at: float) -> None:
        """The test started; written through at once, so `msa shop load` sees the run begin."""
        self._file.write(orjson.dumps({"event": "start", "at": at}) + b"\n")
        self._file.flush()

    def stopping(self, at: float, users: int) -> None:
        self._file.write(orjson.dumps({"event": "stopping", "at": at, "users": users}) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
