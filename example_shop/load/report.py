"""The figures of a load run, from its run log and what became of its orders.

Every rate has one stated denominator:

- requests/s and orders placed/s: over the *measured* time, from the first request sent to the
  last answer received (the load generator's wall clock);
- orders completed/s: over the time from the first order placed to the last one completed, by
  the orders service's clock (`created_at`, `updated_at`), since orders complete after the load
  that placed them.

Answers are sorted into disjoint classes, per endpoint: `2xx`, `4xx` (but 429), `429` (the
gateway's rate-limiting tiers answer so by design), `5xx` (but circuit-open), `circuit_open`
(the gateway's breaker for the upstream is open: 503 without calling it), `no_answer` (refused,
reset, timed out) and `other` (1xx, 3xx). Only a checkout answered 202 placed an order; any
other answer to it is reported, by status, as not placed.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from example_shop.load.orders import COMPLETED, FINAL, UNKNOWN, Settlement
from example_shop.load.runlog import CHECKOUT, RequestRecord, RunLog

__all__ = ["ANSWER_CLASSES", "EndpointFigures", "LoadReport", "OrderFigures", "summarize"]

ANSWER_CLASSES = ("2xx", "4xx", "429", "5xx", "circuit_open", "no_answer", "other")
MEASURED = "from the first request sent to the last answer received"
_COLUMNS = ("2xx", "4xx", "429", "5xx", "circuit_open", "no_answer")


@dataclass(frozen=True, kw_only=True)
class EndpointFigures:
    endpoint: str
    """`METHOD name`, or `all requests`."""
    requests: int
    per_second: float
    """`requests` over the run's measured seconds."""
    answers: dict[str, int]
    """How many of each of `ANSWER_CLASSES` (they add up to `requests`)."""
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    """Latency percentiles of every request (nearest rank), None when there was none."""

    @property
    def non_2xx(self) -> int:
        return self.requests - self.answers["2xx"]


@dataclass(frozen=True, kw_only=True)
class OrderFigures:
    checkouts: int
    placed: int
    """Checkouts answered 202 (an order id was given)."""
    placed_per_s: float
    not_placed: dict[str, int]
    """The other checkout answers, by status (`"0"`: no answer)."""
    completed: int
    """Orders that reached `confirmed` or `cancelled`."""
    completed_per_s: float | None
    completion_window_s: float | None
    """From the first order placed to the last completed (the orders service's clock)."""
    confirmed: int
    cancelled: int
    failed: int
    pending: int
    """Not final yet when the tool stopped waiting."""
    unread: int
    """Not read at all (see `settle_error`)."""
    settle_wait_s: float
    settle_error: str | None


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    host: str
    users: int
    users_running: int | None
    """Users running when the run stopped (None: Locust never started the test)."""
    spawn_rate: float
    """Users started per second."""
    spawn_rate_asked: float
    """The rate asked for (`spawn_rate` is higher when that would not have started all users
    within the first half of the run)."""
    duration_s: float
    """The run time asked for."""
    measured_s: float
    """From the first request sent to the last answer received."""
    requests: int
    requests_per_s: float
    endpoints: list[EndpointFigures]
    all_requests: EndpointFigures
    orders: OrderFigures

    @property
    def problems(self) -> list[str]:
        """What went wrong: answers the shop should not give, orders that did not complete."""
        answers, orders = self.all_requests.answers, self.orders
        found = [
            f"{label}: {answers[kind]}"
            for kind, label in (
                ("5xx", "5xx answers"),
                ("circuit_open", "circuit-open answers"),
                ("no_answer", "requests without an answer"),
            )
            if answers[kind]
        ]
        if self.requests == 0:
            found.append("no request was made")
        for count, label in (
            (orders.failed, "orders failed"),
            (orders.pending, "orders still pending"),
            (orders.unread, "orders not read"),
        ):
            if count:
                found.append(f"{label}: {count}")
        return found

    def as_json(self) -> dict[str, Any]:
        """Every figure, as JSON values (seconds as `_s`, latencies as `_ms`)."""
        figures = asdict(self)
        figures["measured"] = MEASURED
        figures["problems"] = self.problems
        return figures

    def render(self) -> str:
        """The text report."""
        running = "none" if self.users_running is None else str(self.users_running)
        lines = [
            f"{self.users} users against {self.host} for {self.duration_s:g} s "
            f"(spawn rate {self.spawn_rate:g}/s; {running} running at the end)",
            *(
                [
                    f"(spawn rate raised from {self.spawn_rate_asked:g}/s: all users start within "
                    "the first half of the run)"
                ]
                if self.spawn_rate != self.spawn_rate_asked
                else []
            ),
            f"measured: {self.measured_s:.2f} s, {MEASURED}",
            "",
            f"{'endpoint':<28} {'requests':>8} {'req/s':>7} {'p50 ms':>6} {'p95 ms':>6} "
            f"{'p99 ms':>6} {'2xx':>5} {'4xx':>5} {'429':>5} {'5xx':>5} {'open':>5} {'none':>5}",
        ]
        for row in [*self.endpoints, self.all_requests]:
            lines.append(
                f"{row.endpoint[:28]:<28} {row.requests:>8} {row.per_second:>7.2f} "
                f"{_ms(row.p50_ms):>6} {_ms(row.p95_ms):>6} {_ms(row.p99_ms):>6} "
                + " ".join(f"{row.answers[kind]:>5}" for kind in _COLUMNS)
            )
        lines += [
            "",
            "4xx: client errors but 429  429: rate-limited by the gateway's tiers (by design)",
            "5xx: server errors but circuit-open  open: the gateway's circuit breaker was open "
            "(503)",
            "none: no answer (refused, reset, timed out)",
        ]
        if self.all_requests.answers["other"]:
            lines.append(f"other answers (1xx, 3xx): {self.all_requests.answers['other']}")
        orders = self.orders
        refused = ", ".join(
            f"{'no answer' if status == '0' else status} x{count}"
            for status, count in sorted(orders.not_placed.items())
        )
        refused = f" ({refused})" if refused else ""
        lines += [
            "",
            f"checkouts: {orders.checkouts}; placed (answered 202): {orders.placed}; "
            f"not placed: {orders.checkouts - orders.placed}{refused}",
            f"orders placed: {orders.placed}, {orders.placed_per_s:.2f}/s over the measured "
            f"{self.measured_s:.2f} s",
            f"orders completed: {orders.completed} (confirmed {orders.confirmed}, cancelled "
            f"{orders.cancelled}), "
            + (
                "no rate (no completion time known)"
                if orders.completed_per_s is None or orders.completion_window_s is None
                else f"{orders.completed_per_s:.2f}/s over {orders.completion_window_s:.2f} s"
            ),
            "  (from the first order placed to the last completed, by the orders service's clock)",
            f"orders not completed: failed {orders.failed}, still pending {orders.pending}, "
            f"not read {orders.unread} (read and waited {orders.settle_wait_s:.1f} s)",
        ]
        if orders.settle_error:
            lines.append(f"reading the orders failed: {orders.settle_error}")
        problems = self.problems
        lines.append("problems: " + ("; ".join(problems) if problems else "none"))
        return "\n".join(lines)


def summarize(
    log: RunLog,
    settlement: Settlement,
    *,
    host: str,
    users: int,
    spawn_rate: float,
    spawn_rate_asked: float | None = None,
    duration_s: float,
) -> LoadReport:
    """The report of a run: its log, and what the orders it placed became."""
    records = log.requests
    measured = _measured_seconds(records)
    by_endpoint: defaultdict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        by_endpoint[f"{record.method} {record.name}"].append(record)
    endpoints = [_endpoint(name, rows, measured) for name, rows in sorted(by_endpoint.items())]
    everything = _endpoint("all requests", records, measured)
    return LoadReport(
        host=host,
        users=users,
        users_running=log.users_running,
        spawn_rate=spawn_rate,
        spawn_rate_asked=spawn_rate if spawn_rate_asked is None else spawn_rate_asked,
        duration_s=duration_s,
        measured_s=measured,
        requests=len(records),
        requests_per_s=everything.per_second,
        endpoints=endpoints,
        all_requests=everything,
        orders=_orders(records, settlement, measured),
    )


def answer_class(record: RequestRecord) -> str:
    status = record.status
    if status == 0:
        return "no_answer"
    if record.circuit_open:
        return "circuit_open"
    if status == 429:
        return "429"
    if 200 <= status < 300:
        return "2xx"
    if 400 <= status < 500:
        return "4xx"
    if 500 <= status < 600:
        return "5xx"
    return "other"


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """The nearest-rank `p`th percentile of `sorted_values` (None when empty)."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def _measured_seconds(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    return max(r.answered_at for r in records) - min(r.at for r in records)


def _per_second(count: int, seconds: float | None) -> float:
    return count / seconds if seconds else 0.0


def _endpoint(name: str, rows: Sequence[RequestRecord], measured: float) -> EndpointFigures:
    latencies = sorted(r.ms for r in rows)
    kinds = Counter(answer_class(r) for r in rows)
    return EndpointFigures(
        endpoint=name,
        requests=len(rows),
        per_second=_per_second(len(rows), measured),
        answers={kind: kinds[kind] for kind in ANSWER_CLASSES},
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
    )


def _orders(
    records: Iterable[RequestRecord], settlement: Settlement, measured: float
) -> OrderFigures:
    checkouts = [r for r in records if r.name == CHECKOUT]
    placed_ids = [r.order_id for r in checkouts if r.status == 202 and r.order_id is not None]
    not_placed = Counter(str(r.status) for r in checkouts if r.order_id is None)
    states = [settlement.orders[i] for i in placed_ids if i in settlement.orders]
    statuses = Counter(s.status for s in states)
    completed = [s for s in states if s.status in COMPLETED]
    window = None
    created = [s.created_at for s in states if s.created_at is not None]
    finished = [s.updated_at for s in completed if s.updated_at is not None]
    if created and finished and len(finished) == len(completed):
        window = (max(finished) - min(created)).total_seconds()
    return OrderFigures(
        checkouts=len(checkouts),
        placed=len(placed_ids),
        placed_per_s=_per_second(len(placed_ids), measured),
        not_placed=dict(not_placed),
        completed=len(completed),
        completed_per_s=_per_second(len(completed), window) if window else None,
        completion_window_s=window,
        confirmed=statuses["confirmed"],
        cancelled=statuses["cancelled"],
        failed=sum(n for status, n in statuses.items() if status in FINAL - COMPLETED),
        pending=sum(n for status, n in statuses.items() if status not in FINAL | {UNKNOWN}),
        unread=statuses[UNKNOWN] + len(placed_ids) - len(states),
        settle_wait_s=settlement.waited,
        settle_error=settlement.error,
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
