"""The `msa` command line.

msa run module:Service                 run a service until SIGTERM (see framework.runner)
msa asyncapi module:Service            print its AsyncAPI 3.0 document
msa openapi module:Service             print its OpenAPI 3.1 document
msa gateway --config gateway.yaml    run the API gateway until SIGTERM (hot-reloads the file)
msa gateway --check gateway.yaml     validate a gateway config and exit (1 with its problems)
msa shop [--real] [--port 8000]     run the example shop on one machine (see example_shop.shop)
msa shop load [--users N] [--duration 30s]
                                       drive the running shop with Locust, print a summary
msa graph [module:Service ...] [--gateway FILE ...] [--format mermaid|svg]
                                       draw the system from its declarations (default: the shop)
msa dlq replay TOPIC.dlq [--limit N] [--dry-run]
                                       publish dead letters back to their original topic
                                       (transport from MSA_TRANSPORT / KAFKA_BOOTSTRAP)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from framework import __version__
from framework.errors import MsaError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa",
        description="msa-framework: run and inspect event-driven microservices.",
    )
    parser.add_argument("--version", action="version", version=f"msa-framework {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run a service until SIGTERM")
    run.add_argument("target", help="module:Service (a class, an instance or a factory)")

    for name, what in (("asyncapi", "AsyncAPI 3.0"), ("openapi", "OpenAPI 3.1")):
        doc = commands.add_parser(name, help=f"print a service's {what} document")
        doc.add_argument("target", help="module:Service")

    migrate = commands.add_parser(
        "migrate", help="apply the database migrations of a service's resources, then exit"
    )
    migrate.add_argument("target", help="module:Service (a class, an instance or a factory)")

    gateway = commands.add_parser("gateway", help="run the API gateway")
    mode = gateway.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", help="the gateway's YAML config (reloaded when it changes)")
    mode.add_argument("--check", metavar="CONFIG", help="validate a config and exit")

    shop = commands.add_parser("shop", help="run the example shop, or load it")
    shop.add_argument("action", nargs="?", choices=["run", "load"], default="run")
    shop.add_argument("--real", action="store_true", help="Kafka/PostgreSQL/MongoDB from env")
    shop.add_argument("--port", type=int, default=8000, help="the web gateway's port")
    shop.add_argument("--users", type=int, default=20, help="load: simulated users")
    shop.add_argument("--spawn-rate", type=float, default=10, help="load: users started per s")
    shop.add_argument("--duration", default="30s", help="load: how long (Locust syntax)")
    shop.add_argument("--host", default=None, help="load: the shop's URL")

    graph = commands.add_parser("graph", help="draw services, topics, databases and routes")
    graph.add_argument("targets", nargs="*", help="module:Service (default: the example shop)")
    graph.add_argument("--gateway", action="append", default=[], help="a gateway config")
    graph.add_argument("--format", choices=["mermaid", "svg"], default="mermaid")

    dlq = commands.add_parser("dlq", help="dead-letter topics")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    replay = dlq_commands.add_parser("replay", help="publish dead letters back to their topic")
    replay.add_argument("topic", help="the dead-letter topic, e.g. orders.dlq")
    replay.add_argument("--limit", type=int, default=None, help="replay at most N records")
    replay.add_argument("--dry-run", action="store_true", help="list, publish nothing")
    return parser


async def _replay(topic: str, limit: int | None, dry_run: bool) -> int:
    from framework.bus.dlq import replay
    from framework.service import ServiceSettings

    transport = ServiceSettings.from_env().make_transport()
    await transport.start()
    try:
        report = await replay(transport, topic, limit=limit, dry_run=dry_run)
    finally:
        await transport.stop()
    verb = "would replay" if dry_run else "replayed"
    for letter in report.replayed:
        print(
            f"{verb} {letter.record.topic}[{letter.record.partition}]@{letter.record.offset} "
            f"-> {letter.original_topic} ({letter.error_type}: {letter.error_message})"
        )
    print(f"{verb} {report.count} record(s) from {topic}")
    return 0


async def _gateway(path: str) -> int:
    """Run a gateway until SIGTERM/SIGINT; stop it gracefully (in-flight requests finish)."""
    import signal

    from framework.gateway.app import Gateway
    from framework.observability.logging import configure_logging

    configure_logging("gateway")
    gateway = Gateway.from_file(path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await gateway.start()
    print(f"gateway listening on port {gateway.port} (admin {gateway.admin_port})", flush=True)
    await stop.wait()
    await gateway.stop()
    return 0


def _check_gateway(path: str) -> int:
    from framework.gateway.config import GatewayConfigError, load_config

    try:
        config = load_config(path)
    except GatewayConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(config.routes)} routes, {len(config.upstreams)} upstreams)")
    return 0


def _graph(targets: list[str], gateways: list[str], fmt: str) -> int:
    from framework.gateway.config import load_config
    from framework.graph import describe, render_mermaid, render_svg
    from framework.runner import load_service
    from framework.service import ServiceSettings

    if not targets:
        from example_shop.shop import GATEWAY_CONFIGS, service_classes

        settings = ServiceSettings(
            http_port=-1, env={"POSTGRES_URL": "postgresql://x/y", "MONGO_URL": "mongodb://x:27017"}
        )
        services = [cls(settings) for cls in service_classes().values()]
        gateways = gateways or [
            str(GATEWAY_CONFIGS / f"{n}.yaml") for n in ("web", "mobile", "internal")
        ]
    else:
        services = [load_service(target) for target in targets]
    configs = {Path(g).stem: load_config(g, env={}) for g in gateways}
    graph = describe(services, configs)
    sys.stdout.write(render_svg(graph) if fmt == "svg" else render_mermaid(graph))
    return 0


async def _migrate(target: str) -> int:
    """Start each resource that has migrations without its service, migrate, stop it."""
    from framework.runner import load_service

    service = load_service(target)
    databases = [r for r in service.resources if callable(getattr(r, "migrate", None))]
    if not databases:
        print(f"{service.name}: no resource with migrations")
        return 0
    for database in databases:
        database.apply_migrations = False  # type: ignore[attr-defined]
        await database.start()
        try:
            applied = await database.migrate()  # type: ignore[attr-defined]
        finally:
            await database.stop()
        names = ", ".join(f"{m.component}:{m.version} {m.name}" for m in applied) or "none"
        print(f"{service.name}: {type(database).__name__}: applied {len(applied)} ({names})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from framework.runner import run

            return run(args.target)
        if args.command in ("asyncapi", "openapi"):
            from framework import docs
            from framework.runner import service_class

            document = getattr(docs, args.command)(service_class(args.target))
            sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        if args.command == "migrate":
            return asyncio.run(_migrate(args.target))
        if args.command == "gateway":
            if args.check:
                return _check_gateway(args.check)
            from framework.runner import _install_uvloop

            with asyncio.Runner(loop_factory=_install_uvloop()) as runner:
                return runner.run(_gateway(args.config))
        if args.command == "shop":
            if args.action == "load":
                from example_shop.load import run_load

                return run_load(
                    host=args.host or f"http://localhost:{args.port}",
                    users=args.users,
                    spawn_rate=args.spawn_rate,
                    duration=args.duration,
                )
            from example_shop.shop import serve
            from framework.observability.logging import configure_logging
            from framework.runner import _install_uvloop

            configure_logging("shop", level=os.environ.get("MSA_LOG_LEVEL", "WARNING"))
            with asyncio.Runner(loop_factory=_install_uvloop()) as runner:
                return runner.run(serve(args.real, args.port))
        if args.command == "graph":
            return _graph(args.targets, args.gateway, args.format)
        if args.command == "dlq":
            return asyncio.run(_replay(args.topic, args.limit, args.dry_run))
    except MsaError as exc:
        print(f"msa: error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
