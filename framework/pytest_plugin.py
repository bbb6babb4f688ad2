"""pytest plugin of msa-framework (registered as the `msa` pytest11 entry point).

Fixtures:

- `msa_transport`: a fresh `MemoryTransport` per test.
- `msa_harness`: a factory; `msa_harness(MyService)` (a class or an instance) returns a
  `ServiceHarness` with the HTTP side off, on `msa_transport` unless a transport is given:

      async def test_it(msa_harness):
          async with msa_harness(Shipping) as harness:
              await harness.publish("orders", OrderPaid(order_id="o-1"), key="o-1")
              await harness.handled(OrderPaid)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from framework.bus import MemoryTransport
from framework.service import Service, ServiceSettings
from framework.testing import ServiceHarness
from framework.types import Transport

__all__ = ["msa_harness", "msa_transport"]


@pytest.fixture
def msa_transport() -> MemoryTransport:
    return MemoryTransport()


@pytest.fixture
def msa_harness(msa_transport: MemoryTransport) -> Callable[..., ServiceHarness]:
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
