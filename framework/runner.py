"""Running a service as a process: `msa run module:Service`.

`run("shop.orders:Orders")` imports the target (a `Service` subclass, an instance, or a
zero-argument factory returning one), configures JSON logging, uses uvloop when it is installed,
starts the service and waits for SIGTERM or SIGINT. Then it stops the service gracefully (see
`framework.service` for the order of events) within `MSA_SHUTDOWN_GRACE` seconds and exits 0.
A second signal during the stop exits at once with status 130. A service that fails to start
exits 1 with the error logged.

The `msa` commands that take a `module:Service` target put the working directory first on
`sys.path` (`import_from_working_directory`), as `python -m` and uvicorn do, so that
`msa run notify.service:Notify` run next to `notify/` finds it without `PYTHONPATH=.`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from framework.errors import ConfigurationError
from framework.observability.logging import configure_logging
from framework.service import Service, ServiceSettings

__all__ = ["import_from_working_directory", "load_service", "run", "serve"]

log = logging.getLogger("framework.runner")


def import_from_working_directory() -> None:
    """Put the working directory first on `sys.path`, so its modules import as targets."""
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in (cwd, ""):
        sys.path.insert(0, cwd)


def load_target(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"expected 'module:attribute', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from None
    return target


def load_service(spec: str, settings: ServiceSettings | None = None) -> Service:
    """The service named by `module:attribute` (class, instance or factory)."""
    target = load_target(spec)
    if isinstance(target, Service):
        return target
    if isinstance(target, type) and issubclass(target, Service):
        return target(settings)
    if callable(target):
        made = target()
        if isinstance(made, Service):
            return made
    raise ConfigurationError(f"{spec!r} is not a Service subclass, instance or factory")


def service_class(spec: str) -> type[Service]:
    target = load_target(spec)
    if isinstance(target, Service):
        return type(target)
    if isinstance(target, type) and issubclass(target, Service):
        return target
    raise ConfigurationError(f"{spec!r} is not a Service subclass or instance")


async def serve(
    service: Service, *, stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
) -> int:
    """Start `service`, wait for a stop signal, stop it gracefully. Returns the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second stop signal: exiting without draining")
            sys.exit(130)
        stop.set()

    for signum in stop_signals:
        loop.add_signal_handler(signum, on_signal)
    try:
        try:
            await service.start()
        except Exception:
            log.exception("service %s failed to start", service.name)
            return 1
        await stop.wait()
        await service.stop()
        return 0
    finally:
        for signum in stop_signals:
            loop.remove_signal_handler(signum)


def _install_uvloop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(spec: str) -> int:
    settings = ServiceSettings.from_env()
    service = load_service(spec, settings)
    configure_logging(service.name, level=settings.log_level, json=settings.log_format == "json")
    loop_factory = _install_uvloop()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(service))
