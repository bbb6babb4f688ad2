"""The shop behind its web gateway under overload: twice its measured capacity, then half of it.

    .venv/bin/python benchmarks/overload.py                 # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/overload.py --baseline      # the pools without their new guards
    .venv/bin/python benchmarks/overload.py --overload 20 --recovery 15     # a shorter run

The shop runs as its own process, `msa shop --port <free port>`: every service and the `web`
gateway in one process, embedded PostgreSQL, in-memory Kafka and MongoDB (its services keep
their fixed ports 8101-8108, which must be free). This script is the load generator:

1. Setup: `--buyers` accounts are signed up and signed in through the gateway (a bearer token
   each), then 3 s of untimed warm-up.
2. Capacity, closed loop: `--workers` loops, each sending its next request when the last one
   answered, for `--capacity-seconds`; the capacity is the 2xx answers per second.
3. Overload, open loop: requests start at 2x the capacity for `--overload` seconds, then at 0.5x
   for `--recovery` seconds, on a fixed schedule whatever the answers (a request's latency runs
   from its scheduled start, so a late generator is not hidden; the lag is reported). A request
   not answered within 5 s is given up and counted as unanswered.

The mix is example_shop/load/locustfile.py's, by requests: three quarters anonymous browsing
(product search : product page : categories = 3 : 2 : 1) and one quarter buyers (add to cart,
then place the order with an approved card, a declined one in one case of five). The order is
sent when the cart answered 2xx, so it counts as offered only then. A checkout takes a buyer
that is not in another checkout (nor had a request go unanswered: the shop may still place that
order and empty the next cart); only when no buyer is left do two checkouts share one, and a 409
(the cart is empty) to such a checkout is the shop's right answer to a double submit, counted
apart from the other statuses.

Rate limits: the web gateway limits anonymous clients per address (20 req/s, bursts of 40) and
signed-in ones per user. To load the shop rather than its rate limiter, the anonymous requests
come from `--addresses` loopback addresses (127.0.0.2, 127.0.0.3, ...: Linux routes all of
127/8 to lo, and the gateway sees each as its own client), and the buyers are `--buyers`
accounts. No gateway setting is changed; a 429 is still a valid answer.

Every 5 s window prints the offered rate, the answers by status, the unanswered, p50/p99 of all
requests started in it (an unanswered one counts as slower than 5 s) and of its 2xx answers, the
shop process's RSS (VmRSS) at the window's end, its CPU time per request started in the window
(the Python process only, not its PostgreSQL children), how busy the shop process (`shop%`, of
one core), the load generator (`gen%`) and the whole machine (`host%`, of all cores) were - on a
shared machine, other work shows as host% the three do not explain, and a starved shop answers
late whatever its code does - and the gateway's upstream limits from its admin API
(`/admin/upstreams`: the concurrency limit of `orders`, `catalog` and `inventory`). Then the
verdicts: answers only 2xx/429/503; under 0.5% unanswered; memory flat under overload; p99 under
1 s within 10 s of the drop to half load (1 s buckets; from then on every bucket's p99 is under
1 s). The embedded shop's in-memory Kafka keeps every record while the process lives
(framework/bus/memory.py), so its RSS grows with the work done whatever the gateway does; "flat
under overload" is therefore judged per unit of work: the RSS growth per 1,000 2xx answers from
10 s into the overload to its end may be at most 1.5 times that of the half-load recovery. A pool
that queues (or anything else that keeps per-request state under overload) fails it; the raw
numbers are printed too.

`--baseline` starts the shop with every upstream pool as it was before bounded queue waits and
adaptive limits (`queue_timeout` an hour, so a call waits for a slot as long as its timeout
allows, and `adaptive` off), to compare on the same machine.

Exit status 1 when the shop does not start or the run fails; a missed verdict is a result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import os
import random
import re
import secrets
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from _common import environment, percentile

HOST = "127.0.0.1"
ANSWER_WITHIN = 5.0
"""Seconds after which a request is given up and counted as unanswered."""
WINDOW = 5
SHOP_START_TIMEOUT = 180.0
SHOP_STOP_TIMEOUT = 30.0
SHOP_PORTS = range(8101, 8109)
"""The shop's services listen on these whatever the gateway's port (example_shop.common.PORTS)."""
WATCHED_UPSTREAMS = ("orders", "catalog", "inventory")

SEARCHES = ["mug", "tea", "coffee", "green", "glaze", "filter", "", "cup"]
PRODUCTS = [f"p-{n:03d}" for n in range(1, 25) if n not in (13, 14)]
APPROVED, DECLINED = "4242424242424242", "4000000000000002"
PASSWORD = "overload-Bench-2024"

UNANSWERED = 0
CONNECTION_ERROR = -1


class Failure(Exception):
    """The run cannot go on (the shop did not start, setup failed)."""


# -- the shop process -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


class ShopProcess:
    """`msa shop` (or the `--baseline` wrapper of it) as a child process."""

    def __init__(self, *, baseline: bool, logs: Path) -> None:
        self.baseline = baseline
        self.port = free_port()
        self.admin_port = free_port()
        self.admin_token = secrets.token_urlsafe(16)
        self.stderr = logs / "shop.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        self._stdout: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ports(self) -> list[int]:
        """Fixed ports the shop binds, which must be free before it starts."""
        return list(SHOP_PORTS)

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The shop's argv and environment."""
        if self.baseline:
            argv = [sys.executable, __file__, "--role", "baseline-shop", "--port", str(self.port)]
        else:
            argv = [str(Path(sys.executable).parent / "msa"), "shop", "--port", str(self.port)]
        digest = hashlib.sha256(self.admin_token.encode()).hexdigest()
        env = {
            **os.environ,
            "GATEWAY_ADMIN_PORT": str(self.admin_port),
            "GATEWAY_ADMIN_TOKEN_HASH": f"sha256:{digest}",
            "MSA_LOG_LEVEL": "WARNING",
        }
        return argv, env

    def saw(self, line: bytes) -> None:
        """A line the shop printed before it was running (a subclass may keep what it says)."""

    async def start(self) -> None:
        busy = [port for port in self.ports() if port_in_use(port)]
        if busy:
            raise Failure(f"the shop's ports {busy} are in use (is a shop running?)")
        argv, env = self.command()
        with self.stderr.open("ab") as stderr:  # a file: a chatty child never blocks on it
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(SHOP_START_TIMEOUT):
                while True:
                    line = await self.proc.stdout.readline()
                    self.saw(line)
                    if b"msa shop is running" in line:
                        break
                    if self.proc.stdout.at_eof():
                        raise Failure(f"the shop exited: {self.tail()}")
        except TimeoutError:
            await self.stop()
            raise Failure(f"the shop did not start within {SHOP_START_TIMEOUT:.0f} s") from None
        except Failure:
            await self.stop()
            raise
        self._stdout = asyncio.create_task(self._drain(self.proc.stdout))

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    def tail(self) -> str:
        try:
            data = self.stderr.read_bytes()[-3000:]
        except OSError:
            return "(no stderr)"
        return " ".join(data.decode(errors="replace").split())[-600:] or "(no stderr)"

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(SHOP_STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._stdout is not None:
            self._stdout.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stdout

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return math.nan

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def upstreams(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """The gateway's `/admin/upstreams` (empty when it does not answer within a second)."""
        try:
            async with (
                asyncio.timeout(1),
                session.get(
                    f"http://{HOST}:{self.admin_port}/admin/upstreams",
                    headers={"Authorization": f"Bearer {self.admin_token}"},
                ) as response,
            ):
                document: dict[str, Any] = await response.json()
                return document
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return {}


def role_baseline_shop(port: int) -> int:
    """`msa shop` whose gateway pools wait for a slot as long as a call's timeout allows and
    have no adaptive limit: the pools as they were before those guards."""
    import example_shop.shop as shop_module
    from example_shop.cli import command

    load_config = shop_module.load_config

    def without_guards(path: Path, *, env: Any = None) -> Any:
        config = load_config(path, env=env)
        upstreams = {
            name: upstream.model_copy(update={"queue_timeout": 3600.0, "adaptive": None})
            for name, upstream in config.upstreams.items()
        }
        return config.model_copy(update={"upstreams": upstreams})

    shop_module.load_config = without_guards  # type: ignore[assignment]
    return command.run(argparse.Namespace(action="run", real=False, port=port))


# -- the load client ------------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    """One request: when it was due, what came back and how long it took."""

    due: float
    """Seconds since the measured run began."""
    status: int
    """The HTTP status, or UNANSWERED (not within 5 s), or CONNECTION_ERROR."""
    latency: float
    """Seconds from `due` to the answer (inf when unanswered)."""
    detail: str = ""
    """A 503's problem detail (numbers blanked), another error answer's start."""
    shared: bool = False
    """Part of a checkout that shared a busy buyer: its 409 (the cart is empty) is expected."""


@dataclass(slots=True)
class Buyer:
    email: str
    token: str = ""


@dataclass(frozen=True, slots=True)
class Sample:
    """The processes and the machine at one second of the run."""

    second: float
    """Seconds since the run began."""
    rss_mb: float
    shop_cpu: float
    """CPU seconds the shop process used so far."""
    generator_cpu: float
    """CPU seconds this process (the load generator) used so far."""
    machine: tuple[int, int]
    """(busy, total) jiffies of the whole machine so far."""


@dataclass
class Run:
    """What the open-loop run recorded."""

    answers: list[Answer] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    """Seconds each request started after its due time (the generator's own lateness)."""
    overlaps: int = 0
    samples: list[Sample] = field(default_factory=list)
    """Once a second."""
    limits: dict[int, str] = field(default_factory=dict)
    """Window index -> the watched upstreams' limits at its end."""


class LoadClient:
    """aiohttp sessions, one per loopback source address, without cookies."""

    def __init__(self, base: str, addresses: int) -> None:
        self.base = base
        self.sessions = [
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, local_addr=(f"127.0.0.{2 + n}", 0)),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
            )
            for n in range(addresses)
        ]
        self.admin = aiohttp.ClientSession()

    async def close(self) -> None:
        for session in [*self.sessions, self.admin]:
            await session.close()

    async def call(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        *,
        deadline: float,
        token: str = "",
        json: Any = None,
    ) -> tuple[int, str, Any]:
        """(status, what an error answer said, a 2xx JSON body) by `deadline` (loop clock)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with (
                asyncio.timeout_at(deadline),
                session.request(method, self.base + path, headers=headers, json=json) as response,
            ):
                body = await response.read()
                status = response.status
        except TimeoutError:
            return UNANSWERED, "", None
        except (aiohttp.ClientError, OSError) as exc:
            return CONNECTION_ERROR, type(exc).__name__, None
        detail = ""
        if status == 503:
            detail = _problem_detail(body)
        elif status >= 400 and status != 429:
            detail = f"{status}: {body[:120].decode(errors='replace')}"
        document = None
        if 200 <= status < 300 and body[:1] == b"{":
            with contextlib.suppress(ValueError):
                document = orjson.loads(body)
        return status, detail, document


def _problem_detail(body: bytes) -> str:
    try:
        detail = str(orjson.loads(body).get("detail", ""))
    except (ValueError, AttributeError):
        detail = body[:80].decode(errors="replace")
    return re.sub(r"\d+(\.\d+)?", "N", detail)


async def sign_up(client: LoadClient, buyers: Sequence[Buyer]) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(4)

    async def one(index: int, buyer: Buyer) -> None:
        session = client.sessions[index % len(client.sessions)]
        async with gate:
            for path, document in (
                ("/api/auth/signup", {"email": buyer.email, "password": PASSWORD, "name": "Bench"}),
                ("/api/auth/login", {"email": buyer.email, "password": PASSWORD}),
            ):
                status, detail, body = await client.call(
                    session, "POST", path, json=document, deadline=loop.time() + 30
                )
                if status not in (200, 201):
                    raise Failure(f"{path} for {buyer.email} answered {status} {detail}")
            buyer.token = body["access_token"]

    await asyncio.gather(*(one(index, buyer) for index, buyer in enumerate(buyers)))


async def restock(client: LoadClient, units: int = 1_000_000) -> None:
    """Stock every product the mix buys deep enough for the whole run: confirmed orders sell
    their units, and a run that sold the shop out would measure 409s, not load."""
    loop = asyncio.get_running_loop()
    session = client.admin
    status, detail, body = await client.call(
        session,
        "POST",
        "/api/auth/login",
        json={"email": "admin@shop.test", "password": "admin-password-123"},
        deadline=loop.time() + 30,
    )
    if status != 200:
        raise Failure(f"the admin sign-in answered {status} {detail}")
    token = body["access_token"]
    for product in PRODUCTS:
        status, detail, _ = await client.call(
            session,
            "PUT",
            f"/api/admin/stock/{product}",
            json={"on_hand": units},
            token=token,
            deadline=loop.time() + 30,
        )
        if status != 200:
            raise Failure(f"restocking {product} answered {status} {detail}")


class Mix:
    """The locustfile's mix: browsing requests and checkouts (cart, then order)."""

    FLOW_SHARE = 1 / 7
    """Of the events: a checkout is two requests, so 1/7 of events is a quarter of requests."""

    def __init__(self, client: LoadClient, buyers: Sequence[Buyer], seed: int = 7) -> None:
        self.client = client
        self.buyers = list(buyers)
        self.idle: deque[Buyer] = deque(buyers)
        self.random = random.Random(seed)
        self.overlaps = 0

    def browse_path(self) -> str:
        pick = self.random.choices(("search", "page", "categories"), weights=(3, 2, 1))[0]
        if pick == "search":
            return f"/api/products?q={self.random.choice(SEARCHES)}&page=1&size=12"
        if pick == "page":
            return f"/api/product-page/{self.random.choice(PRODUCTS)}"
        return "/api/categories"

    async def browse(
        self, session: aiohttp.ClientSession, due: float, record: Callable[[Answer], None]
    ) -> None:
        path = self.browse_path()
        status, detail, _ = await self.client.call(
            session, "GET", path, deadline=due + ANSWER_WITHIN
        )
        record(_answer(due, status, detail))

    async def checkout(
        self,
        session: aiohttp.ClientSession,
        due: float,
        record: Callable[[Answer], None],
        buyer: Buyer | None = None,
    ) -> None:
        """Cart, then (when the cart answered 2xx) the order; `buyer` None: an idle one.

        A buyer with an unanswered request is not taken again: the shop may still be working on
        that request, and an order it places later would empty the cart of the next checkout."""
        owned = shared = False
        if buyer is None:
            if self.idle:
                buyer, owned = self.idle.popleft(), True
            else:
                self.overlaps += 1
                buyer, shared = self.random.choice(self.buyers), True
        loop = asyncio.get_running_loop()
        answered = True
        try:
            product = self.random.choice(PRODUCTS)
            status, detail, _ = await self.client.call(
                session,
                "PUT",
                f"/api/cart/items/{product}",
                token=buyer.token,
                json={"quantity": 1},
                deadline=due + ANSWER_WITHIN,
            )
            record(_answer(due, status, detail, shared=shared))
            answered = status != UNANSWERED
            if not 200 <= status < 300:
                return
            card = DECLINED if self.random.random() < 0.2 else APPROVED
            sent = loop.time()
            status, detail, _ = await self.client.call(
                session,
                "POST",
                "/api/orders",
                token=buyer.token,
                json={"address": "1 Main Street", "card_number": card},
                deadline=sent + ANSWER_WITHIN,
            )
            record(_answer(sent, status, detail, shared=shared))
            answered = status != UNANSWERED
        finally:
            if owned and answered:
                self.idle.append(buyer)


def _answer(due: float, status: int, detail: str, *, shared: bool = False) -> Answer:
    loop_now = asyncio.get_running_loop().time()
    latency = math.inf if status == UNANSWERED else loop_now - due
    return Answer(due=due, status=status, latency=latency, detail=detail, shared=shared)


async def closed_loop(mix: Mix, workers: int, seconds: float) -> list[Answer]:
    """`workers` loops, each with its own buyer and source address, for `seconds`."""
    loop = asyncio.get_running_loop()
    answers: list[Answer] = []
    end = loop.time() + seconds
    sessions = mix.client.sessions

    async def worker(index: int) -> None:
        session = sessions[index % len(sessions)]
        buyer = mix.buyers[index % len(mix.buyers)]
        while loop.time() < end:
            if mix.random.random() < Mix.FLOW_SHARE:
                await mix.checkout(session, loop.time(), answers.append, buyer)
            else:
                await mix.browse(session, loop.time(), answers.append)

    await asyncio.gather(*(worker(index) for index in range(workers)))
    return answers


async def open_loop(
    mix: Mix, shop: ShopProcess, phases: Sequence[tuple[float, float]], run: Run
) -> None:
    """Events on a fixed schedule: `phases` are (requests per second, seconds), back to back."""
    loop = asyncio.get_running_loop()
    began = loop.time() + 0.1
    sessions = mix.client.sessions
    running: set[asyncio.Task[None]] = set()

    def record(answer: Answer) -> None:
        answer.due -= began
        run.answers.append(answer)

    async def event(due: float, index: int) -> None:
        run.lag.append(loop.time() - due)
        session = sessions[index % len(sessions)]
        if mix.random.random() < Mix.FLOW_SHARE:
            await mix.checkout(session, due, record)
        else:
            await mix.browse(session, due, record)

    sampler = asyncio.create_task(sample(shop, mix.client, began, run))
    index = 0
    phase_start = began
    try:
        for rate, seconds in phases:
            events_per_second = rate / (1 + Mix.FLOW_SHARE)  # a checkout is two requests
            count = int(events_per_second * seconds)
            for n in range(count):
                due = phase_start + n / events_per_second
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(event(due, index))
                running.add(task)
                task.add_done_callback(running.discard)
                index += 1
            phase_start += seconds
        await asyncio.gather(*running)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    run.overlaps = mix.overlaps


async def sample(shop: ShopProcess, client: LoadClient, began: float, run: Run) -> None:
    """RSS and CPU once a second; the watched upstreams' limits at every window's end."""
    loop = asyncio.get_running_loop()
    second = 0
    while True:
        await asyncio.sleep(max(0.0, began + second - loop.time()))
        run.samples.append(
            Sample(
                second=float(second),
                rss_mb=shop.rss_mb(),
                shop_cpu=shop.cpu_seconds(),
                generator_cpu=time.process_time(),
                machine=machine_jiffies(),
            )
        )
        if second and second % WINDOW == 0:
            run.limits[second // WINDOW - 1] = _limits(await shop.upstreams(client.admin))
        second += 1


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _limits(upstreams: dict[str, Any]) -> str:
    parts = []
    for name in WATCHED_UPSTREAMS:
        limit = upstreams.get(name, {}).get("concurrency", {}).get("limit")
        parts.append("-" if limit is None else str(limit))
    return "/".join(parts)


# -- the report -----------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    if math.isinf(seconds):
        return ">5000"
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.0f}"


def _p(values: Sequence[float], q: float) -> float:
    return percentile(values, q) if values else math.nan


def _sample_at(run: Run, second: float) -> Sample:
    return min(run.samples, key=lambda s: abs(s.second - second))


def windows_table(run: Run, overload: float, recovery: float) -> str:
    header = (
        f"{'t s':>7}  {'phase':<8} {'offered/s':>9} {'2xx':>5} {'429':>5} {'503':>5} "
        f"{'other':>5} {'unans':>5} {'p50 ms':>7} {'p99 ms':>7} {'p99 2xx':>7} {'RSS MB':>7} "
        f"{'CPU ms/req':>10} {'shop%':>5} {'gen%':>4} {'host%':>5}  "
        f"limits {'/'.join(WATCHED_UPSTREAMS)}"
    )
    lines = [header, "-" * len(header)]
    total = overload + recovery
    for index in range(math.ceil(total / WINDOW)):
        start, end = index * WINDOW, min(total, (index + 1) * WINDOW)
        inside = [a for a in run.answers if start <= a.due < end]
        statuses = Counter(_column(a) for a in inside)
        latencies = [a.latency for a in inside]
        ok = [a.latency for a in inside if 200 <= a.status < 300]
        first, last = _sample_at(run, start), _sample_at(run, end)
        seconds = max(1.0, last.second - first.second)
        shop_cpu = last.shop_cpu - first.shop_cpu
        cpu = shop_cpu / len(inside) * 1000 if inside else math.nan
        busy = last.machine[0] - first.machine[0]
        host = busy / max(1, last.machine[1] - first.machine[1])
        generator = (last.generator_cpu - first.generator_cpu) / seconds
        phase = "2x" if start < overload else "0.5x"
        lines.append(
            f"{start:>3}-{end:<3g}  {phase:<8} {len(inside) / (end - start):>9.1f} "
            f"{statuses['2xx']:>5} {statuses['429']:>5} {statuses['503']:>5} "
            f"{statuses['other']:>5} {statuses['unanswered']:>5} "
            f"{_ms(_p(latencies, 50)):>7} {_ms(_p(latencies, 99)):>7} {_ms(_p(ok, 99)):>7} "
            f"{last.rss_mb:>7.1f} {cpu:>10.2f} {shop_cpu / seconds:>5.0%} {generator:>4.0%} "
            f"{host:>5.0%}  {run.limits.get(index, '?')}"
        )
    return "\n".join(lines)


def _column(answer: Answer) -> str:
    status = answer.status
    if status == UNANSWERED:
        return "unanswered"
    if 200 <= status < 300:
        return "2xx"
    if status in (429, 503):
        return str(status)
    if status == 409 and answer.shared:
        return "409 shared"
    return "other"


def recovery_seconds(run: Run, overload: float, recovery: float) -> float | None:
    """Seconds after the drop to half load until every later 1 s bucket's p99 is under 1 s."""
    buckets = int(recovery)
    p99s = []
    for second in range(buckets):
        start = overload + second
        latencies = [a.latency for a in run.answers if start <= a.due < start + 1]
        p99s.append(_p(latencies, 99) if latencies else 0.0)
    for second in range(buckets):
        if all(p < 1.0 for p in p99s[second:]):
            return float(second)
    return None


def verdicts(run: Run, overload: float, recovery: float) -> list[str]:
    answers = run.answers
    other = Counter(a.status for a in answers if _column(a) == "other")
    shared = sum(1 for a in answers if _column(a) == "409 shared")
    unanswered = sum(1 for a in answers if a.status == UNANSWERED)
    share = unanswered / len(answers) if answers else 0.0
    settled = min(10.0, overload)
    rss_start = _sample_at(run, settled).rss_mb
    rss_overload = _sample_at(run, overload).rss_mb
    rss_end = _sample_at(run, overload + recovery).rss_mb
    per_overload = _mb_per_thousand_ok(run, settled, overload, rss_overload - rss_start)
    per_recovery = _mb_per_thousand_ok(run, overload, overload + recovery, rss_end - rss_overload)
    flat = per_overload <= 1.5 * max(per_recovery, 0.1)
    recovered = recovery_seconds(run, overload, recovery)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    others = ", ".join(f"{status}: {count}" for status, count in sorted(other.items())) or "none"
    return [
        f"only 2xx/429/503 answers          {verdict(not other):<5} (others: {others}; "
        f"409 to checkouts sharing a busy buyer, not counted: {shared})",
        f"unanswered at 5 s < 0.5%          {verdict(share < 0.005):<5} "
        f"({share:.2%}: {unanswered:,} of {len(answers):,})",
        f"memory flat under overload        {verdict(flat):<5} "
        f"(RSS {rss_start:.0f} MB 10 s into the overload, {rss_overload:.0f} MB at its end, "
        f"{rss_end:.0f} MB after the recovery; {per_overload:.2f} MB per 1,000 2xx answers "
        f"in the overload, {per_recovery:.2f} in the recovery)",
        f"p99 < 1 s within 10 s of 0.5x     "
        f"{verdict(recovered is not None and recovered <= 10):<5} "
        + (
            f"(after {recovered:g} s)"
            if recovered is not None
            else "(p99 not under 1 s to the end of the run)"
        ),
    ]


def _mb_per_thousand_ok(run: Run, start: float, end: float, growth_mb: float) -> float:
    ok = sum(1 for a in run.answers if start <= a.due < end and 200 <= a.status < 300)
    return growth_mb / ok * 1000 if ok else math.nan


def summary(run: Run, snapshot: dict[str, Any]) -> str:
    answers = run.answers
    statuses = Counter(a.status for a in answers)
    details = Counter(a.detail for a in answers if a.detail)
    lines = [
        f"requests {len(answers):,}; by status: "
        + ", ".join(
            f"{_status_name(status)} {count:,}" for status, count in sorted(statuses.items())
        ),
        f"generator lag: p99 {_p(run.lag, 99) * 1000:.1f} ms, max {max(run.lag) * 1000:.1f} ms; "
        f"checkouts sharing a busy buyer: {run.overlaps} (a 409 to one is the shop's right answer "
        "to a double submit, counted apart)",
        "non-2xx answers by detail (numbers as N):",
        *(f"  {count:>6,}  {detail}" for detail, count in details.most_common(8)),
        "the gateway's upstream pools at the end:",
    ]
    for name, pool in snapshot.items():
        counters = ", ".join(f"{k} {v}" for k, v in pool.get("counters", {}).items())
        concurrency = pool.get("concurrency")
        limit = "" if concurrency is None else f"; concurrency {concurrency}"
        lines.append(f"  {name:<10} breaker {pool['breaker']['state']}; {counters}{limit}")
    return "\n".join(lines)


def _status_name(status: int) -> str:
    return {UNANSWERED: "unanswered", CONNECTION_ERROR: "connection error"}.get(status, str(status))


# -- the run --------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    logs = Path(tempfile.mkdtemp(prefix="overload-"))
    shop = ShopProcess(baseline=args.baseline, logs=logs)
    print(
        environment(
            ["aiohttp", "uvloop", "pydantic"],
            extra=[
                ("Run", f"{'baseline pools' if args.baseline else 'current pools'}; logs in {logs}")
            ],
        ),
        flush=True,
    )
    started = time.perf_counter()
    try:
        await shop.start()
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"shop pid {shop.pid} on {shop.url}, up in {time.perf_counter() - started:.1f} s")
    client = LoadClient(shop.url, args.addresses)
    try:
        return await measure(args, shop, client)
    except Failure as exc:
        print(f"error: {exc}; shop stderr: {shop.tail()}", file=sys.stderr)
        return 1
    finally:
        await client.close()
        await shop.stop()


async def measure(args: argparse.Namespace, shop: ShopProcess, client: LoadClient) -> int:
    tag = f"{os.getpid()}-{int(time.time())}"
    buyers = [Buyer(email=f"bench-{tag}-{n}@shop.test") for n in range(args.buyers)]
    await sign_up(client, buyers)
    await restock(client)
    mix = Mix(client, buyers)
    await closed_loop(mix, args.workers, 3.0)  # warm-up

    cpu0, began = shop.cpu_seconds(), time.perf_counter()
    answers = await closed_loop(mix, args.workers, args.capacity_seconds)
    elapsed = time.perf_counter() - began
    ok = [a for a in answers if 200 <= a.status < 300]
    capacity = len(ok) / elapsed
    print(
        f"\ncapacity (closed loop, {args.workers} workers, {elapsed:.0f} s): {capacity:.1f} req/s "
        f"2xx ({len(answers) - len(ok)} other answers), p50 {_ms(_p([a.latency for a in ok], 50))} "
        f"ms, p99 {_ms(_p([a.latency for a in ok], 99))} ms, "
        f"shop CPU {(shop.cpu_seconds() - cpu0) / len(answers) * 1000:.2f} ms/req"
    )
    if capacity <= 0:
        raise Failure("no 2xx answer in the capacity measurement")
    high, low = 2 * capacity, capacity / 2
    print(
        f"open loop: {high:.0f} req/s for {args.overload:g} s, then {low:.0f} req/s for "
        f"{args.recovery:g} s; {args.addresses} client addresses, {args.buyers} buyers\n",
        flush=True,
    )
    mix.overlaps = 0
    run = Run()
    await open_loop(mix, shop, [(high, args.overload), (low, args.recovery)], run)
    snapshot = await shop.upstreams(client.admin)
    print(windows_table(run, args.overload, args.recovery))
    print()
    print(summary(run, snapshot))
    print()
    print("\n".join(verdicts(run, args.overload, args.recovery)))
    return 0


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baseline", action="store_true", help="pools without the new guards")
    parser.add_argument("--overload", type=float, default=60, help="seconds at 2x capacity")
    parser.add_argument("--recovery", type=float, default=30, help="seconds at 0.5x capacity")
    parser.add_argument("--capacity-seconds", type=float, default=10)
    parser.add_argument("--workers", type=int, default=32, help="closed-loop concurrency")
    parser.add_argument("--buyers", type=int, default=200)
    parser.add_argument("--addresses", type=int, default=32, help="loopback client addresses")
    parser.add_argument("--role", choices=["baseline-shop"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    if arguments.role == "baseline-shop":
        sys.exit(role_baseline_shop(arguments.port))
    sys.exit(uvloop.run(main(arguments)))
