"""What became of the orders a load run placed: read through the gateway as their customer.

A checkout answered 202 has placed an order; its saga then confirms or cancels it (or, when a
compensation itself fails, marks it failed). `settle_orders` signs in as the buyers' account and
reads the orders' statuses until every one is final or `timeout` has passed:

    settlement = settle_orders("http://localhost:8000", ["01J...", "01J..."], timeout=30)
    settlement.orders["01J..."].status     # "confirmed", "cancelled", "failed", "pending", ...

A round reads `GET /api/orders` (the newest 100, one request) and asks `GET /api/orders/{id}` for
each order not among them; an order already final is not read again. The gateway's tier limits
the account like any other client: a 429 is waited out (`Retry-After`) and the read repeated.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from example_shop.load.runlog import BUYER_EMAIL, BUYER_PASSWORD

__all__ = [
    "COMPLETED",
    "FINAL",
    "SETTLE_TIMEOUT",
    "UNKNOWN",
    "OrderState",
    "Settlement",
    "settle_orders",
]

SETTLE_TIMEOUT = 30.0
"""How long `msa shop load` waits for the orders still pending when the load ends."""
COMPLETED = frozenset({"confirmed", "cancelled"})
"""The statuses of an order whose saga finished: completed."""
FINAL = COMPLETED | {"failed"}
"""The statuses an order never leaves (`failed`: a compensation failed, see the orders saga)."""
UNKNOWN = "unknown"
"""The status of an order that could not be read."""

_REQUEST_TIMEOUT = 10.0
_RATE_LIMIT_RETRIES = 30


@dataclass(frozen=True, kw_only=True, slots=True)
class OrderState:
    order_id: str
    status: str
    created_at: datetime | None = None
    """When the orders service placed it (its clock)."""
    updated_at: datetime | None = None
    """When its status last changed (its clock): for a final status, when it was reached."""


@dataclass(kw_only=True)
class Settlement:
    orders: dict[str, OrderState] = field(default_factory=dict)
    waited: float = 0.0
    """Seconds spent reading and waiting."""
    error: str | None = None
    """Why some orders could not be read (the sign-in failed, the shop stopped answering)."""


class _ShopReader:
    """Just enough HTTP (the standard library's) to read the account's orders."""

    def __init__(self, host: str) -> None:
        self.host = host.rstrip("/")
        self.token = ""

    def sign_in(self) -> None:
        status, body = self.call(
            "POST", "/api/auth/login", {"email": BUYER_EMAIL, "password": BUYER_PASSWORD}
        )
        if status != 200 or not isinstance(body, dict) or "access_token" not in body:
            raise OSError(f"signing in as {BUYER_EMAIL} answered {status}")
        self.token = body["access_token"]

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """(status, JSON body or None), once any 429 has been waited out."""
        data = orjson.dumps(payload) if payload is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for _ in range(_RATE_LIMIT_RETRIES):
            request = urllib.request.Request(
                self.host + path, data=data, headers=headers, method=method
            )
            try:
                with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT) as response:
                    return response.status, _json(response.read())
            except urllib.error.HTTPError as answer:
                if answer.code != 429:
                    return answer.code, _json(answer.read())
                time.sleep(_retry_after(answer.headers.get("Retry-After")))
        return 429, None


def settle_orders(
    host: str,
    order_ids: Sequence[str],
    *,
    timeout: float = SETTLE_TIMEOUT,
    poll: float = 0.5,
    on_round: Callable[[int], None] | None = None,
) -> Settlement:
    """The status of every order in `order_ids`, once all are final or `timeout` has passed.

    A round that started always finishes (the first reads every order, however many), so the
    statuses are known even when reading them takes longer than `timeout`. `on_round` is told
    how many orders are not final yet, before each round.
    """
    began = time.monotonic()
    deadline = began + timeout
    settlement = Settlement(orders={i: OrderState(order_id=i, status=UNKNOWN) for i in order_ids})
    if not order_ids:
        return settlement
    reader = _ShopReader(host)
    try:
        reader.sign_in()
        while True:
            open_ids = [i for i, s in settlement.orders.items() if s.status not in FINAL]
            if not open_ids:
                break
            if on_round is not None:
                on_round(len(open_ids))
            _read_round(reader, open_ids, settlement.orders)
            if time.monotonic() >= deadline or all(
                settlement.orders[i].status in FINAL for i in open_ids
            ):
                break
            time.sleep(poll)
    except OSError as exc:  # urllib's URLError and timeouts are OSErrors
        settlement.error = str(exc)
    settlement.waited = time.monotonic() - began
    return settlement


def _read_round(reader: _ShopReader, open_ids: list[str], orders: dict[str, OrderState]) -> None:
    status, body = reader.call("GET", "/api/orders")
    listed = {}
    if status == 200 and isinstance(body, dict):
        listed = {o["order_id"]: o for o in body.get("orders", []) if isinstance(o, dict)}
    for order_id in open_ids:
        order = listed.get(order_id)
        if order is None:
            status, order = reader.call("GET", f"/api/orders/{order_id}")
            if status != 200 or not isinstance(order, dict):
                continue
        orders[order_id] = OrderState(
            order_id=order_id,
            status=str(order.get("status", UNKNOWN)),
            created_at=_timestamp(order.get("created_at")),
            updated_at=_timestamp(order.get("updated_at")),
        )


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.1), 10.0)
    except ValueError:
        return 1.0


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
