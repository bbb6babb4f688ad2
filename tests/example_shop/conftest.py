"""The running shop for the end-to-end tests: one embedded shop per test session."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from example_shop.shop import START_ORDER, Shop


def free_ports(count: int) -> list[int]:
    """`count` ports free now, from below the kernel's ephemeral range (32768 and up).

    A port the kernel handed out (bind to 0) and released can be taken again as the local port
    of any outgoing connection before the shop binds it; one below that range can only be taken
    by someone binding it on purpose.
    """
    chosen: list[int] = []
    rng = random.Random()
    while len(chosen) < count:
        port = rng.randrange(20_000, 32_000)
        if port in chosen:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


async def start_shop(
    real: bool, env: dict[str, str] | None = None, data_dir: Path | None = None
) -> Shop:
    ports = free_ports(len(START_ORDER) + 1)
    shop = Shop(
        real=real,
        env=env,
        data_dir=data_dir,
        gateway_port=ports[0],
        ports=dict(zip(START_ORDER, ports[1:], strict=True)),
    )
    try:
        await shop.start()
    except BaseException:
        await shop.stop()
        raise
    return shop


@pytest.fixture(scope="package")  # gone before other packages' tests count their tasks
async def embedded_shop() -> AsyncIterator[Shop]:
    """`msa shop` as the README starts it: one process, embedded defaults."""
    shop = await start_shop(real=False, env={"PATH": "/usr/bin:/bin"})
    yield shop
    await shop.stop()
