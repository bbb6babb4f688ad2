"""The `msa` command line.

msa run module:Service                 run a service until SIGTERM (see framework.runner)
msa asyncapi module:Service            print its AsyncAPI 3.0 document
msa openapi module:Service             print its OpenAPI 3.1 document
msa migrate module:Service [--admin-url URL]
                                       apply the migrations of the service's databases, then
                                       exit; with an admin's URL (or POSTGRES_ADMIN_URL), first
                                       create the service's missing PostgreSQL role and
                                       database (PostgresResource.provision)
msa gateway --config gateway.yaml [--workers N]
                                       run the API gateway until SIGTERM (hot-reloads the
                                       file); with N workers, N processes share its port
                                       (see framework.gateway.workers)
msa gateway --check gateway.yaml     validate a gateway config and exit (1 with its problems)
msa graph [module:Service ...] [--gateway FILE ...] [--format mermaid|svg]
                                       draw the system from its declarations (with neither
                                       targets nor --gateway: the one an installed command
                                       registers, e.g. the example shop)
msa dlq replay TOPIC.dlq [--limit N] [--dry-run] [--max-replays N] [--until-empty [--max-rounds N]]
                                       publish the dead letters there now back to their
                                       original topic; park those replayed N times already
                                       in TOPIC.dlq.parked (see framework.bus.dlq)
msa shop [--real] [--port 8000]        the example shop on one machine, and `msa shop load`
                                       to drive it with Locust: added by the shop's
                                       distribution (msa-example-shop), when installed

The module:Service commands import the target with the working directory first on sys.path (no
PYTHONPATH=. needed). `msa run --help` lists the environment variables a service reads.
Commands that need a broker (`msa dlq replay`) refuse the in-memory bus: set MSA_TRANSPORT=kafka
and KAFKA_BOOTSTRAP. Errors exit 2 with `msa: error: ...` on stderr.

Commands from other distributions: an entry point in the group `msa.commands` adds one. Its name
is the command's, its object a `Command`: the line `msa --help` shows, a function that sets up
the command's arguments, the function that runs it, and optionally `graph`, the system `msa
graph` draws when given neither targets nor --gateway. The example shop adds `msa shop` so
(example_shop/pyproject.toml and example_shop/cli.py):

    [project.entry-points."msa.commands"]
    shop = "example_shop.cli:command"

    def _arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("action", nargs="?", choices=["run", "load"], default="run")
        parser.add_argument("--port", type=int, default=8000)

    def _run(args: argparse.Namespace) -> int:
        ...  # import what the command needs here, when it runs: not when `msa` starts

    command = Command(
        help="run the example shop, or load it", arguments=_arguments, run=_run, graph=_graph
    )

`msa` loads these entry points whenever it starts, so keep their modules light. Where the shop is
not installed, `msa shop` says how to install it. The framework itself never imports the shop.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from framework import __version__
from framework.errors import ConfigurationError, MsaError
from framework.types import Record, Transport

if TYPE_CHECKING:
    from framework.graph import SystemGraph

__all__ = [
    "COMMANDS_GROUP",
    "RUN_ENVIRONMENT",
    "Command",
    "build_parser",
    "installed_commands",
    "main",
]

RUN_ENVIRONMENT = """\
environment (read by ServiceSettings.from_env and KafkaSettings.from_env):
  MSA_TRANSPORT            memory or kafka (default: kafka if KAFKA_BOOTSTRAP is set, else memory)
  MSA_HTTP_HOST            the address the HTTP side listens on (default: 0.0.0.0)
  MSA_HTTP_PORT            its port; 0 picks a free one, -1 turns it off (default: 8080)
  MSA_SHUTDOWN_GRACE       seconds running handlers get to finish after SIGTERM (default: 25)
  MSA_INSTANCE_ID          this replica's id, e.g. in its reply topic (default: a random one)
  MSA_LOG_LEVEL            DEBUG, INFO, WARNING or ERROR (default: INFO)
  MSA_LOG_FORMAT           json or text (default: json)
  MSA_FAULTS               1 obeys the fault switches on topic msa.faults (default: 0)
  KAFKA_BOOTSTRAP          the Kafka brokers, host:port[,host:port] (default: none)
  KAFKA_CLIENT             aiokafka or confluent: the Kafka client (default: aiokafka)
  KAFKA_CLIENT_ID          the client id the brokers see (default: msa)
  KAFKA_LINGER_MS          milliseconds a record waits for its batch to fill (default: 5)
  KAFKA_COMPRESSION        gzip, lz4, zstd, snappy or none (default: none)
  KAFKA_SECURITY_PROTOCOL  PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (default: PLAINTEXT)
  KAFKA_SASL_MECHANISM     PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (default: PLAIN)
  KAFKA_SASL_USERNAME      the SASL user name (default: none)
  KAFKA_SASL_PASSWORD      the SASL password (default: none)
  KAFKA_SSL_CA_LOCATION    with KAFKA_CLIENT=confluent: the brokers' CA file (default: system)
Resources read their own variables from the same environment (e.g. POSTGRES_URL, MONGO_URL).
"""
"""The `msa run --help` epilog; a test holds it to what the settings' `from_env` read."""

GATEWAY_ENVIRONMENT = """\
environment (besides the ${NAME}s its config reads):
  MSA_LOG_LEVEL            DEBUG, INFO, WARNING or ERROR (default: INFO)
  MSA_LOG_FORMAT           json or text (default: json)
  MSA_ACCESS_LOG_FILE      append the access log (a JSON line per request) to this file,
                           instead of stderr (default: none, stderr)
"""
"""The `msa gateway --help` epilog."""

TARGET_COMMANDS = frozenset({"run", "asyncapi", "openapi", "migrate", "graph"})
"""Commands that import `module:Service` targets (from the working directory first)."""

BUILTIN_COMMANDS = frozenset({*TARGET_COMMANDS, "gateway", "dlq"})

COMMANDS_GROUP = "msa.commands"
"""The entry-point group through which other distributions add commands (see the docstring)."""

NOT_INSTALLED = {
    "shop": (
        "the example shop",
        "pip install msa-example-shop (in a clone of msa-framework: scripts/shop, or "
        "pip install -e ./example_shop)",
    ),
}
"""Commands that other distributions add: what they are and how to install them, for the
message `msa <command>` gives where that distribution is missing."""


@dataclass(frozen=True, kw_only=True)
class Command:
    """A command another distribution adds to `msa` (entry-point group `msa.commands`).

    `arguments` sets up the command's own parser; `run` gets the parsed arguments and returns
    the exit status (raise `MsaError` for `msa: error: ...` and status 2); `graph`, if given,
    returns the system `msa graph` draws when called with neither targets nor --gateway.
    """

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    graph: Callable[[], SystemGraph] | None = None


def installed_commands() -> dict[str, Command]:
    """The commands installed distributions add, by name (loading their entry points)."""
    commands: dict[str, Command] = {}
    for entry in importlib.metadata.entry_points(group=COMMANDS_GROUP):
        where = f"entry point {entry.name} = {entry.value} (group {COMMANDS_GROUP})"
        if entry.name in BUILTIN_COMMANDS or entry.name in commands:
            raise ConfigurationError(f"{where}: msa {entry.name} exists already")
        command = entry.load()
        if not isinstance(command, Command):
            raise ConfigurationError(f"{where}: not a framework.cli.Command")
        commands[entry.name] = command
    return commands


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def _worker_count(text: str) -> int:
    from framework.gateway.workers import worker_count

    return worker_count(text)


def build_parser(installed: Mapping[str, Command] | None = None) -> argparse.ArgumentParser:
    """The `msa` parser, with the `installed` commands (default: `installed_commands()`)."""
    if installed is None:
        installed = installed_commands()
    parser = argparse.ArgumentParser(
        prog="msa",
        description="msa-framework: run and inspect event-driven microservices.",
    )
    parser.add_argument("--version", action="version", version=f"msa-framework {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a service until SIGTERM",
        description="Run a service until SIGTERM or SIGINT, then stop it gracefully.",
        epilog=RUN_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("target", help="module:Service (a class, an instance or a factory)")

    for name, what in (("asyncapi", "AsyncAPI 3.0"), ("openapi", "OpenAPI 3.1")):
        doc = commands.add_parser(name, help=f"print a service's {what} document")
        doc.add_argument("target", help="module:Service")

    migrate = commands.add_parser(
        "migrate", help="apply the database migrations of a service's resources, then exit"
    )
    migrate.add_argument("target", help="module:Service (a class, an instance or a factory)")
    migrate.add_argument(
        "--admin-url",
        metavar="URL",
        help="a PostgreSQL admin's URL (default: $POSTGRES_ADMIN_URL, which keeps the password "
        "off the command line): first create the role and database each PostgreSQL URL of the "
        "service names, when missing; the migrations then run as the service's own role",
    )

    gateway = commands.add_parser(
        "gateway",
        help="run the API gateway",
        description="Run the API gateway until SIGTERM or SIGINT, then stop it gracefully.",
        epilog=GATEWAY_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = gateway.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", help="the gateway's YAML config (reloaded when it changes)")
    mode.add_argument("--check", metavar="CONFIG", help="validate a config and exit")
    gateway.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="run N gateway processes on one port (SO_REUSEPORT, Linux) under a supervisor "
        "that restarts them; each enforces 1/N of every rate limit and quota, so a client on "
        "one keep-alive connection meets 1/N of its limit (default: 1, a single process)",
    )

    graph = commands.add_parser("graph", help="draw services, topics, databases and routes")
    graph.add_argument(
        "targets",
        nargs="*",
        help="module:Service (with no targets and no --gateway: the system an installed "
        "command registers, e.g. the example shop's)",
    )
    graph.add_argument("--gateway", action="append", default=[], help="a gateway config")
    graph.add_argument("--format", choices=["mermaid", "svg"], default="mermaid")

    dlq = commands.add_parser("dlq", help="dead-letter topics")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    replay = dlq_commands.add_parser(
        "replay",
        help="publish dead letters back to their topic",
        description="Publish the dead letters a dead-letter topic holds now back to their "
        "original topic, then stop; each replayed record carries msa-replay-count. Needs a "
        "broker (MSA_TRANSPORT=kafka, KAFKA_BOOTSTRAP).",
    )
    replay.add_argument("topic", help="the dead-letter topic, e.g. orders.dlq")
    replay.add_argument(
        "--limit", type=_not_negative, default=None, help="take at most N dead letters"
    )
    replay.add_argument("--dry-run", action="store_true", help="list, publish nothing")
    replay.add_argument(
        "--max-replays",
        type=_not_negative,
        default=3,
        metavar="N",
        help="park a dead letter replayed N times already in TOPIC.parked (default: 3)",
    )
    replay.add_argument(
        "--until-empty",
        action="store_true",
        help="then replay the dead letters that arrived meanwhile, round after round",
    )
    replay.add_argument(
        "--max-rounds",
        type=_positive,
        default=3,
        metavar="N",
        help="with --until-empty, stop after N rounds (default: 3)",
    )

    for name, command in installed.items():
        command.arguments(commands.add_parser(name, help=command.help))
    for name, (what, _) in NOT_INSTALLED.items():
        if name not in installed:
            # Takes every argument as it comes (even --help), to say how to install the command.
            missing = commands.add_parser(
                name, help=f"{what} (not installed)", add_help=False, prefix_chars="\0"
            )
            missing.add_argument("arguments", nargs="*")
    return parser


def _broker_transport(command: str) -> Transport:
    """The transport the environment names, refusing the in-memory one (it holds nothing
    another process wrote)."""
    from framework.bus import MemoryTransport
    from framework.service import ServiceSettings

    transport = ServiceSettings.from_env().make_transport()
    if isinstance(transport, MemoryTransport):
        raise ConfigurationError(
            f"{command} needs a broker: set MSA_TRANSPORT=kafka and KAFKA_BOOTSTRAP"
        )
    return transport


async def _replay(args: argparse.Namespace) -> int:
    from framework.bus.dlq import replay

    transport = _broker_transport("msa dlq replay")
    await transport.start()
    try:
        report = await replay(
            transport,
            args.topic,
            limit=args.limit,
            dry_run=args.dry_run,
            until_empty=args.until_empty,
            max_rounds=args.max_rounds,
            max_replays=args.max_replays,
        )
    finally:
        await transport.stop()
    replayed, parked = ("would replay", "would park") if args.dry_run else ("replayed", "parked")
    for letter in report.replayed:
        print(
            f"{replayed} {_where(letter.record)} -> {letter.original_topic} "
            f"(replay {letter.replays + 1}; {letter.error_type}: {letter.error_message})"
        )
    for letter in report.parked:
        print(
            f"{parked} {_where(letter.record)} -> {report.parked_topic} "
            f"(replayed {letter.replays} times; {letter.error_type}: {letter.error_message})"
        )
    print(
        f"{replayed} {report.count} record(s) from {args.topic}; "
        f"{parked} {len(report.parked)} in {report.parked_topic}"
    )
    return 0


def _where(record: Record) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"


async def _gateway(path: str) -> int:
    """Run a gateway until SIGTERM/SIGINT; stop it gracefully (in-flight requests finish)."""
    import signal

    from framework.gateway.app import Gateway, settle_garbage_collector
    from framework.gateway.metering import AccessLog
    from framework.observability.logging import configure_logging

    configure_logging("gateway")
    gateway = Gateway.from_file(path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    access_log = AccessLog.from_env()  # its lines are written by a thread, off the loop
    access_log.start()
    try:
        await gateway.start()
        settle_garbage_collector()  # this process serves this one gateway
        print(f"gateway listening on port {gateway.port} (admin {gateway.admin_port})", flush=True)
        await stop.wait()
        await gateway.stop()
    finally:
        access_log.stop()  # after the last request: writes every line still queued
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


def _graph(
    targets: list[str], gateways: list[str], fmt: str, installed: Mapping[str, Command]
) -> int:
    from framework.gateway.config import load_config
    from framework.graph import describe, render_mermaid, render_svg
    from framework.runner import load_service

    if targets or gateways:
        services = [load_service(target) for target in targets]
        configs = {  # drawn, never served: development secrets may stand
            Path(g).stem: load_config(g, env={}, allow_development_secrets=True) for g in gateways
        }
        graph = describe(services, configs)
    else:
        systems = {name: c.graph for name, c in installed.items() if c.graph is not None}
        if len(systems) != 1:
            why = (
                f"several installed commands register a system: {', '.join(sorted(systems))}"
                if systems
                else "no installed command registers a system to draw"
            )
            raise ConfigurationError(f"msa graph: name module:Service targets or --gateway ({why})")
        [draw] = systems.values()
        graph = draw()
    sys.stdout.write(render_svg(graph) if fmt == "svg" else render_mermaid(graph))
    return 0


async def _migrate(target: str, admin_url: str | None = None) -> int:
    """Start each resource that has migrations without its service, migrate, stop it.

    With `admin_url`, each resource that can (`PostgresResource.provision`) first creates its
    missing role and database as that admin; the migrations still run as the service's role,
    so what they create belongs to it, as when the service migrates at start.
    """
    from framework.runner import load_service

    service = load_service(target)
    databases = [r for r in service.resources if callable(getattr(r, "migrate", None))]
    if not databases:
        print(f"{service.name}: no resource with migrations")
        return 0
    for database in databases:
        provision = getattr(database, "provision", None)
        if admin_url and callable(provision):
            for statement in await provision(admin_url):
                print(f"{service.name}: {type(database).__name__}: ran {statement}")
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
    try:
        installed = installed_commands()
    except MsaError as exc:
        print(f"msa: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser(installed)
    args = parser.parse_args(argv)
    if args.command in TARGET_COMMANDS:
        from framework.runner import import_from_working_directory

        import_from_working_directory()
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
            admin_url = args.admin_url or os.environ.get("POSTGRES_ADMIN_URL") or None
            return asyncio.run(_migrate(args.target, admin_url))
        if args.command == "gateway":
            if args.check:
                return _check_gateway(args.check)
            from framework.runner import _install_uvloop

            with asyncio.Runner(loop_factory=_install_uvloop()) as runner:
                if args.workers > 1:
                    from framework.gateway.workers import supervise

                    return runner.run(supervise(args.config, args.workers))
                return runner.run(_gateway(args.config))
        if args.command == "graph":
            return _graph(args.targets, args.gateway, args.format, installed)
        if args.command == "dlq":
            return asyncio.run(_replay(args))
        if args.command in installed:
            return installed[args.command].run(args)
        if args.command in NOT_INSTALLED:
            what, install = NOT_INSTALLED[args.command]
            raise ConfigurationError(
                f"msa {args.command} comes with {what}, which is not installed: {install}"
            )
    except MsaError as exc:
        print(f"msa: error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    # `python -m framework.cli`: run the imported module's main, so that commands registered
    # by other packages meet the same `Command` class as `msa` does (not this `__main__` copy).
    from framework.cli import main as imported_main

    sys.exit(imported_main())
