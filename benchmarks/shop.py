"""The shop for real: closed-loop customers placing orders through the web gateway.

    .venv/bin/python benchmarks/shop.py                           # one process, 20 s, fresh
    .venv/bin/python benchmarks/shop.py --warm-orders 0,1000      # fresh, then after 1,000 more
    .venv/bin/python benchmarks/shop.py --rate 100                # a fixed 100 orders/s
    source /tmp/devenv.sh && .venv/bin/python benchmarks/shop.py --mode processes

`--mode one` starts `msa shop --port <free port>` (every service and the gateway in one process,
embedded PostgreSQL, in-memory Kafka and MongoDB); `--mode processes` starts `msa shop
--processes --port <free port>` (each service its own `msa run` process, on the Kafka,
PostgreSQL and MongoDB the environment names). Either way the shop's service ports 8101-8108
must be free. This script is the load generator (benchmarks/overload.py's client, sign-up and
restock):

1. Setup: every product is restocked to 1,000,000 units (admin API), `--buyers` accounts sign up
   and sign in (a bearer token each).
2. Stages, one per `--warm-orders` entry (cumulative): first that many orders are placed in all,
   unmeasured, to grow the stored data; then `--seconds` of measurement.
3. An order: `PUT /api/cart/items/<product>` (1 unit), `POST /api/orders` (202 with its id), then
   the SSE stream `/api/live/orders/<id>` is opened and, once it answered, `GET /api/orders/<id>`
   checks whether the order became terminal before the stream was there; otherwise the stream's
   `shop.orders.confirmed` / `shop.orders.cancelled` / a `failed` status change ends it.
   Place-to-terminal runs from sending the POST to seeing the terminal state.

Closed loop (default): `--customers` loops, each placing its next order once the last one is
terminal, with the buyers spread over the customers (a customer takes its buyers in turn: the
gateway limits each signed-in user to 20 req/s, and an order is four requests). `--rate R`: an
order starts every 1/R s whatever the answers, with an idle buyer (a start without one is
counted as skipped); its latency runs from the POST too, and the generator's lag is reported.

Per stage: completed orders/s (terminal orders / the time until the last customer finished),
p50/p99 place-to-terminal, the outcomes, the orders stored before and after (the analytics'
all-time `orders_placed`), and CPU ms per completed order of each process: `--mode one` the shop
process and its children (the embedded PostgreSQL, by command name); `--mode processes` every
process of `processes.json` plus the machine's `postgres`, `java` (Kafka) and `mongod` or `ferretdb`
processes. CPU is read from /proc at the stage's start and end, so work that a stage leaves
behind (relays, projections) is counted in the next one.

Targets (issue "[5/9] The shop for real", a 2-core machine): one process >= 300 orders/s, p99 <=
250 ms at 100 orders/s, and CPU per order that does not grow with the orders stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import uvloop
from _common import environment, percentile
from overload import (
    APPROVED,
    PRODUCTS,
    SHOP_PORTS,
    Buyer,
    Failure,
    LoadClient,
    ShopProcess,
    restock,
    sign_up,
)

ORDER_WITHIN = 30.0
"""Seconds after the POST by which an order must be terminal (else it counts as timed out)."""
TERMINAL_EVENTS = {"shop.orders.confirmed": "confirmed", "shop.orders.cancelled": "cancelled"}
TERMINAL_STATUSES = ("confirmed", "cancelled", "failed")
INFRA = ("postgres", "java", "mongod", "ferretdb")
"""Command-name prefixes of the servers' processes (FerretDB's binary is `ferretdb-<version>`)."""


# -- the shop and its processes -------------------------------------------------------------------


class ProcessesShop(ShopProcess):
    """`msa shop --processes` as a child process; its processes are named in `processes.json`."""

    def __init__(self, *, logs: Path) -> None:
        super().__init__(baseline=False, logs=logs)
        self.run_dir: Path | None = None

    def ports(self) -> list[int]:
        return [*SHOP_PORTS, 8001]

    def command(self) -> tuple[list[str], dict[str, str]]:
        argv = [str(Path(sys.executable).parent / "msa"), "shop", "--processes"]
        return [*argv, "--port", str(self.port)], {**os.environ, "MSA_LOG_LEVEL": "WARNING"}

    def saw(self, line: bytes) -> None:
        if b"logs in " in line:
            self.run_dir = Path(line.decode().split("logs in ", 1)[1].strip())

    def named(self) -> dict[int, str]:
        assert self.run_dir is not None
        state = json.loads((self.run_dir / "processes.json").read_text())
        return {int(p["pid"]): name for name, p in state["processes"].items()}


def _stat(pid: int) -> tuple[str, int, float, int] | None:
    """(command name, parent pid, CPU seconds, start time) of a process, None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return comm, int(fields[1]), cpu, int(fields[19])


def cpu_by_process(shop: ShopProcess, mode: str) -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds so far) of every process this run accounts for."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            stats[int(entry)] = stat
    if mode == "one":
        roots = {shop.pid: "shop"}
    else:
        assert isinstance(shop, ProcessesShop)
        roots = {pid: f"msa {name}" for pid, name in shop.named().items()}
    out: dict[int, tuple[str, float]] = {}
    shop_started = stats[shop.pid][3] if shop.pid in stats else 0
    for pid, (comm, _, cpu, started) in stats.items():
        label = roots.get(pid)
        if label is None:  # a descendant of a root: labelled by its command
            parent = stats[pid][1]
            seen = 0
            while parent in stats and parent not in roots and seen < 64:
                parent, seen = stats[parent][1], seen + 1
            if parent in roots:
                label = f"{roots[parent]} > {comm}"
            elif mode == "processes" and comm.startswith(INFRA):
                label = f"infra {next(name for name in INFRA if comm.startswith(name))}"
            elif comm == "postgres" and started >= shop_started:  # the embedded one (daemon)
                label = "shop's embedded postgres"
        if label is not None:
            out[pid] = (label, cpu)
    return out


def cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    totals: Counter[str] = Counter()
    for pid, (label, cpu) in after.items():
        start = before.get(pid)
        totals[label] += cpu - (start[1] if start and start[0] == label else 0.0)
    return dict(totals)


# -- orders ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    status: str
    """confirmed, cancelled, failed, timeout, or `<step> <http status>`."""
    latency: float = float("nan")
    """Seconds from sending the POST to seeing the terminal state."""


@dataclass
class Stage:
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: int = 0
    lag: list[float] = field(default_factory=list)


class Shopper:
    """Places orders through the gateway and waits for them to be terminal."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self.random = random.Random(7)

    async def close(self) -> None:
        await self.session.close()

    async def order(self, buyer: Buyer) -> Outcome:
        headers = {"Authorization": f"Bearer {buyer.token}"}
        product = self.random.choice(PRODUCTS)
        try:
            async with asyncio.timeout(ORDER_WITHIN):
                for attempt in range(20):  # a fresh `--processes` shop may not know it yet
                    async with self.session.put(
                        f"{self.base}/api/cart/items/{product}",
                        json={"quantity": 1},
                        headers=headers,
                    ) as response:
                        await response.read()
                        if response.status == 200:
                            break
                        if response.status != 404 or attempt == 19:
                            return Outcome(f"cart {response.status}")
                    await asyncio.sleep(0.5)
                began = time.perf_counter()
                document = {"address": "1 Bench Road", "card_number": APPROVED}
                async with self.session.post(
                    f"{self.base}/api/orders", json=document, headers=headers
                ) as response:
                    body = await response.read()
                    if response.status != 202:
                        return Outcome(f"order {response.status}")
                order_id = orjson.loads(body)["order_id"]
                status = await self._terminal(order_id, headers)
                return Outcome(status, time.perf_counter() - began)
        except TimeoutError:
            return Outcome("timeout")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(type(exc).__name__)

    async def _terminal(self, order_id: str, headers: dict[str, str]) -> str:
        async with self.session.get(
            f"{self.base}/api/live/orders/{order_id}",
            headers={**headers, "Accept": "text/event-stream"},
        ) as stream:
            if stream.status != 200:
                return f"stream {stream.status}"
            # The stream is open: whatever happens from now on reaches it. Before, only the
            # order itself knows.
            async with self.session.get(
                f"{self.base}/api/orders/{order_id}", headers=headers
            ) as response:
                body = await response.read()
                if response.status != 200:
                    return f"get {response.status}"
                status = orjson.loads(body).get("status")
                if status in TERMINAL_STATUSES:
                    return str(status)
            event = ""
            async for raw in stream.content:
                line = raw.rstrip(b"\r\n")
                if line.startswith(b"event: "):
                    event = line[7:].decode()
                elif line.startswith(b"data: "):
                    if event in TERMINAL_EVENTS:
                        return TERMINAL_EVENTS[event]
                    if event == "shop.orders.status_changed":
                        data = orjson.loads(line[6:]).get("data") or {}
                        if data.get("status") == "failed":
                            return "failed"
                    if event == "close":
                        return "stream closed"
            return "stream ended"


async def closed_loop(
    shopper: Shopper, buyers: Sequence[Buyer], customers: int, *, seconds: float, orders: int
) -> tuple[Stage, float]:
    """`customers` loops until `seconds` passed or `orders` were started; (stage, elapsed)."""
    stage = Stage()
    began = time.perf_counter()
    end = began + seconds
    started = 0

    async def customer(index: int) -> None:
        nonlocal started
        mine = buyers[index::customers]
        turn = 0
        while time.perf_counter() < end and started < orders:
            started += 1
            stage.outcomes.append(await shopper.order(mine[turn % len(mine)]))
            turn += 1

    await asyncio.gather(*(customer(i) for i in range(customers)))
    return stage, time.perf_counter() - began


async def open_loop(
    shopper: Shopper, buyers: Sequence[Buyer], rate: float, seconds: float
) -> tuple[Stage, float]:
    """An order every 1/rate s with an idle buyer; (stage, elapsed until the last is done)."""
    stage = Stage()
    idle = deque(buyers)
    tasks: set[asyncio.Task[None]] = set()

    async def one(buyer: Buyer) -> None:
        try:
            stage.outcomes.append(await shopper.order(buyer))
        finally:
            idle.append(buyer)

    began = time.perf_counter()
    for n in range(int(rate * seconds)):
        due = began + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        stage.lag.append(time.perf_counter() - due)
        if not idle:
            stage.skipped += 1
            continue
        task = asyncio.create_task(one(idle.popleft()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return stage, time.perf_counter() - began


# -- the run --------------------------------------------------------------------------------------


async def admin_token(client: LoadClient) -> str:
    async with client.admin.post(
        client.base + "/api/auth/login",
        json={"email": "admin@shop.test", "password": "admin-password-123"},
    ) as response:
        if response.status != 200:
            raise Failure(f"the admin sign-in answered {response.status}")
        return str((await response.json())["access_token"])


async def stored_orders(client: LoadClient, token: str) -> str:
    """The analytics' all-time orders placed (it may lag the orders service by a moment)."""
    await asyncio.sleep(1)
    try:
        async with client.admin.get(
            client.base + "/api/admin/analytics/summary",
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            if response.status != 200:
                return f"({response.status})"
            return f"{(await response.json())['orders_placed']:,}"
    except (aiohttp.ClientError, OSError) as exc:
        return f"({type(exc).__name__})"


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:,.0f}"


def report(
    label: str,
    stage: Stage,
    elapsed: float,
    cpu: dict[str, float],
    stored: tuple[str, str],
) -> str:
    done = [o for o in stage.outcomes if o.status in TERMINAL_STATUSES]
    latencies = [o.latency for o in done]
    outcomes = Counter(o.status for o in stage.outcomes)
    lines = [
        f"{label}: {len(stage.outcomes):,} orders in {elapsed:.1f} s; stored orders "
        f"{stored[0]} -> {stored[1]}",
        "",
        "| completed orders/s | p50 ms | p99 ms | max ms | outcomes |",
        "| ---: | ---: | ---: | ---: | --- |",
        f"| {len(done) / elapsed:,.1f} | {_ms(percentile(latencies, 50))} | "
        f"{_ms(percentile(latencies, 99))} | {_ms(max(latencies, default=float('nan')))} | "
        + ", ".join(f"{k}: {v:,}" for k, v in outcomes.most_common())
        + " |",
    ]
    if stage.lag:
        lines.append(
            f"\nfixed rate: {stage.skipped:,} starts skipped (no idle buyer); generator lag p99 "
            f"{_ms(percentile(stage.lag, 99))} ms"
        )
    lines += [
        "",
        "| process | CPU s | CPU ms/order | of one core |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        if seconds >= 0.005:
            lines.append(
                f"| {name} | {seconds:.2f} | {seconds / max(1, len(done)) * 1000:.2f} | "
                f"{seconds / elapsed:.0%} |"
            )
    total = sum(cpu.values())
    lines.append(
        f"| **all** | {total:.2f} | {total / max(1, len(done)) * 1000:.2f} | "
        f"{total / elapsed:.0%} |"
    )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    stages = [int(n) for n in args.warm_orders.split(",")]
    print(
        environment(
            ["aiohttp", "uvloop"],
            [
                ("mode", args.mode),
                ("load", f"{args.rate:g} orders/s" if args.rate else f"{args.customers} customers"),
                ("buyers", str(args.buyers)),
            ],
        ),
        flush=True,
    )
    logs = Path(tempfile.mkdtemp(prefix="msa-bench-shop-"))
    shop: ShopProcess
    shop = (
        ShopProcess(baseline=False, logs=logs) if args.mode == "one" else ProcessesShop(logs=logs)
    )
    started = time.perf_counter()
    try:
        await shop.start()
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"shop started in {time.perf_counter() - started:.1f} s (logs in {logs})", flush=True)
    client = LoadClient(shop.url, args.addresses)
    shopper = Shopper(shop.url)
    try:
        await restock(client)
        token = await admin_token(client)
        buyers = [Buyer(f"shop-bench-{os.getpid()}-{n}@bench.test") for n in range(args.buyers)]
        began = time.perf_counter()
        await sign_up(client, buyers)
        print(f"{len(buyers)} buyers signed up in {time.perf_counter() - began:.1f} s", flush=True)
        await closed_loop(shopper, buyers, args.customers, seconds=3, orders=10**9)  # warm-up
        placed = 0
        for target in stages:
            if target > placed:
                began = time.perf_counter()
                warm, _ = await closed_loop(
                    shopper, buyers, args.customers, seconds=3600, orders=target - placed
                )
                placed = target
                print(
                    f"placed {len(warm.outcomes):,} warm orders in "
                    f"{time.perf_counter() - began:.0f} s",
                    flush=True,
                )
            before_stored = await stored_orders(client, token)
            before = cpu_by_process(shop, args.mode)
            if args.rate:
                stage, elapsed = await open_loop(shopper, buyers, args.rate, args.seconds)
            else:
                stage, elapsed = await closed_loop(
                    shopper, buyers, args.customers, seconds=args.seconds, orders=10**9
                )
            cpu = cpu_delta(before, cpu_by_process(shop, args.mode))
            after_stored = await stored_orders(client, token)
            label = f"{args.mode}, after {target:,} warm orders"
            print("\n" + report(label, stage, elapsed, cpu, (before_stored, after_stored)))
            print(flush=True)
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await shopper.close()
        await client.close()
        await shop.stop()
    return 0


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=["one", "processes"], default="one")
    parser.add_argument("--customers", type=int, default=32, help="closed-loop customers")
    parser.add_argument("--buyers", type=int, default=128, help="accounts, spread over customers")
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds per stage")
    parser.add_argument(
        "--warm-orders",
        default="0",
        help="comma-separated: a stage after this many unmeasured orders in all (e.g. 0,1000)",
    )
    parser.add_argument("--rate", type=float, default=0, help="fixed orders/s instead of a loop")
    parser.add_argument("--addresses", type=int, default=8, help="loopback addresses for sign-up")
    args = parser.parse_args(argv)
    if args.buyers < args.customers:
        parser.error("--buyers must be at least --customers")
    return args


if __name__ == "__main__":
    sys.exit(uvloop.run(main(parse(sys.argv[1:]))))
