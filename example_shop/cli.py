"""`msa shop`: the shop's command, which its distribution adds to `msa` through the entry point
`shop = "example_shop.cli:command"` (group `msa.commands`, see framework.cli).

    msa shop [--real] [--port 8000]              run the shop on one machine (example_shop.shop)
    msa shop [--data-dir DIR] [--fresh]          ... keeping its data in DIR (default: the
                                                 user's data directory); --fresh empties it
    msa shop --processes [--port 8000]           every service as its own `msa run` process,
                                                 plus the gateway (example_shop.processes)
    msa shop load [--users N] [--duration 30s]   drive the running shop with Locust, print a
                                                 summary (example_shop.load)

It also gives `msa graph`, called with neither targets nor --gateway, the shop to draw. `msa`
imports this module whenever it starts: it imports the shop itself only when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from framework.cli import Command

if TYPE_CHECKING:
    from framework.graph import SystemGraph

__all__ = ["command"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["run", "load"], default="run")
    parser.add_argument("--real", action="store_true", help="Kafka/PostgreSQL/MongoDB from env")
    parser.add_argument(
        "--processes", action="store_true", help="each service its own process (Kafka etc.)"
    )
    parser.add_argument("--port", type=int, default=8000, help="the web gateway's port")
    parser.add_argument("--users", type=int, default=20, help="load: simulated users")
    parser.add_argument("--spawn-rate", type=float, default=10, help="load: users started per s")
    parser.add_argument("--duration", default="30s", help="load: how long (Locust syntax)")
    parser.add_argument("--host", default=None, help="load: the shop's URL")
    parser.add_argument(
        "--json", action="store_true", help="load: print the report as one JSON object"
    )
    parser.add_argument(
        "--data-dir", default=None, help="run: where the embedded databases keep the shop's data"
    )
    parser.add_argument("--fresh", action="store_true", help="run: start with empty databases")


def _run(args: argparse.Namespace) -> int:
    if args.action == "load":
        from example_shop.load import run_load

        return run_load(
            host=args.host or f"http://localhost:{args.port}",
            users=args.users,
            spawn_rate=args.spawn_rate,
            duration=args.duration,
            json_output=args.json,
        )
    if args.processes:
        from example_shop.processes import serve as serve_processes

        return serve_processes(args.port)
    from example_shop.shop import default_data_dir, reset_data, serve
    from framework.observability.logging import configure_logging

    data_dir: Path | None = None
    if args.real or args.processes:
        if args.fresh or args.data_dir:
            print("msa shop: --fresh and --data-dir are for the embedded mode", file=sys.stderr)
            return 2
    else:
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(os.environ)
        if args.fresh:
            reset_data(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
    configure_logging("shop", level=os.environ.get("MSA_LOG_LEVEL", "WARNING"))
    with asyncio.Runner(loop_factory=_uvloop()) as runner:
        return runner.run(serve(args.real, args.port, data_dir=data_dir))


def _uvloop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a dependency of the framework but on Windows)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _graph() -> SystemGraph:
    from example_shop.registry import system_graph
    from example_shop.shop import service_classes

    return system_graph(service_classes().values())


command = Command(
    help="run the example shop, or load it",
    arguments=_arguments,
    run=_run,
    graph=_graph,
)
"""The entry point: `msa shop`, and the shop as `msa graph`'s system."""
