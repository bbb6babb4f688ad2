"""The running shop for the end-to-end tests: one embedded shop per test session."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from example_shop.shop import START_ORDER, Shop


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


async def start_shop(real: bool, env: dict[str, str] | None = None) -> Shop:
    ports = free_ports(len(START_ORDER) + 1)
    shop = Shop(
        real=real,
        env=env,
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
