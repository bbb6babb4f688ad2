"""pytest plugin of msa-framework (registered as the `msa` pytest11 entry point).

Install the test dependencies next to the framework (`pip install pytest pytest-asyncio`), then
write async tests against `msa_harness`; nothing else to configure:

    async def test_ships_paid_orders(msa_harness):
        async with msa_harness(Shipping) as harness:
            await harness.publish("orders", OrderPaid(order_id="o-1"), key="o-1")
            [handled] = await harness.handled(OrderPaid)
            assert handled.error is None
            harness.mock(Shipping.on_order_paid).assert_called_once_with(OrderPaid(order_id="o-1"))

`pytest` runs them on the in-memory bus; `pytest --msa-transport=kafka` runs the very same tests
on the Apache Kafka in `KAFKA_BOOTSTRAP`, with the transport a service given `MSA_TRANSPORT=kafka`
would build (`framework.bus.transport_from_env`): the other `KAFKA_*` variables apply, and
`KAFKA_CLIENT` picks the client, aiokafka by default (`KafkaTransport`, needs
`msa-framework[kafka]`) or `KAFKA_CLIENT=confluent` (`ConfluentTransport`, librdkafka, needs
`msa-framework[kafka-confluent]`). A missing extra, a missing `KAFKA_BOOTSTRAP` or a malformed
variable is a usage error, reported before any test runs.

Fixtures:

- `msa_transport`: the transport of the test: a fresh `MemoryTransport` (one in-memory "cluster";
  services given it share it), or with `--msa-transport=kafka` a new Kafka transport of the
  client `KAFKA_CLIENT` names (not started: the harness starts it).
- `msa_harness`: a factory returning a `framework.testing.ServiceHarness` (see that module for
  everything it records and waits for):

  - `msa_harness(Shipping)`: the class, built with `ServiceSettings(http_port=-1)` (the HTTP
    side off) on `msa_transport`;
  - `msa_harness(Shipping, http_port=0)`: with the HTTP side on a free port, which
    `harness.service.http_port` tells once the harness is entered; any other
    `ServiceSettings` field is a keyword too;
  - `msa_harness(Shipping, transport=KafkaTransport(KafkaSettings(bootstrap_servers=...)))`:
    on a transport of the test's choosing;
  - `msa_harness(Shipping(settings, transport=...))`: an instance, used as it is.

  On a real broker the harness consumes in groups of its own (the service's group plus a unique
  suffix) from the end of the topics as they are when it starts: a test never joins the group
  of a deployed instance of the service, nor handles what was on a shared topic before it.

**Async tests.** The fixtures need pytest-asyncio (`pytest-asyncio>=1.0`, not a dependency of
the framework itself). When the project chose no asyncio mode (no `asyncio_mode` in its pytest
configuration, no `--asyncio-mode` or `-o asyncio_mode=...` on the command line), this plugin
selects pytest-asyncio's `auto` mode: every `async def` test and fixture runs on an event loop
without a marker. A project that sets a mode keeps it; in `strict` mode, mark each async test
`@pytest.mark.asyncio` and each async fixture `@pytest_asyncio.fixture`. To choose `auto`
explicitly (and silence pytest-asyncio's warning about the fixture loop scope), put in
`pyproject.toml`:

    [tool.pytest.ini_options]
    asyncio_mode = "auto"
    asyncio_default_fixture_loop_scope = "function"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from framework.bus import MemoryTransport, transport_from_env
from framework.errors import ConfigurationError
from framework.service import Service, ServiceSettings
from framework.testing import ServiceHarness
from framework.types import Transport

__all__ = ["msa_harness", "msa_transport"]

_ASYNCIO_MODE = "asyncio_mode"
_TRANSPORTS = ("memory", "kafka")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("msa", "msa-framework")
    group.addoption(
        "--msa-transport",
        choices=_TRANSPORTS,
        default="memory",
        help="the transport of the msa_transport fixture (and so of msa_harness): memory "
        "(default) or kafka (the broker in KAFKA_BOOTSTRAP; KAFKA_CLIENT picks the client)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("asyncio") and not _asyncio_mode_chosen(config):
        # pytest-asyncio reads its mode from the option on each use, so this takes effect for
        # the whole session.
        config.option.asyncio_mode = "auto"
    if config.getoption("msa_transport") == "kafka":
        _kafka_transport()  # a missing extra or variable is a usage error, before any test


def _kafka_transport() -> Transport:
    """The Kafka transport the environment describes (`KAFKA_*`, `KAFKA_CLIENT`), as a service
    builds it; a missing extra or a missing or malformed variable is a `pytest.UsageError`."""
    try:
        return transport_from_env(name="kafka")
    except ConfigurationError as exc:
        raise pytest.UsageError(f"--msa-transport=kafka: {exc}") from exc


def _asyncio_mode_chosen(config: pytest.Config) -> bool:
    """Whether the project or the command line set pytest-asyncio's mode."""
    if getattr(config.option, _ASYNCIO_MODE, None) is not None:
        return True
    overrides = getattr(config.option, "override_ini", None) or ()
    if any(o.split("=", 1)[0].strip() == _ASYNCIO_MODE for o in overrides):
        return True
    # The values the configuration file set (pytest 9 keeps them in `_inicfg`, and deprecates
    # the public `inicfg` of pytest 8).
    settings = getattr(config, "_inicfg", None)
    if settings is None:
        settings = getattr(config, "inicfg", {})
    return _ASYNCIO_MODE in settings


@pytest.fixture
def msa_transport(request: pytest.FixtureRequest) -> Transport:
    if request.config.getoption("msa_transport") == "kafka":
        return _kafka_transport()
    return MemoryTransport()


@pytest.fixture
def msa_harness(msa_transport: Transport) -> Callable[..., ServiceHarness]:
    def make(
        service: type[Service] | Service, transport: Transport | None = None, **settings: Any
    ) -> ServiceHarness:
        if isinstance(service, Service):
            return ServiceHarness(service)
        options = {"http_port": -1, **settings}
        return ServiceHarness(
            service(ServiceSettings(**options), transport=transport or msa_transport)
        )

    return make
