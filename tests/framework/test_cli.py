"""The `msa` command line: help (with the environment `msa run` reads), API documents, targets
imported from the working directory, target errors, commands other distributions add (and `msa
shop` where the shop is missing), and `msa dlq replay` (on Kafka; refused on the in-memory bus)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message
from framework.bus.confluent import ConfluentSettings
from framework.bus.consumer import DLQ_PREFIX
from framework.bus.dlq import REPLAY_COUNT
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.bus.kafka_env import kafka_options_from_env
from framework.bus.transports import kafka_client, transport_name
from framework.cli import COMMANDS_GROUP, Command, installed_commands, main
from framework.errors import Reject
from framework.graph import SystemGraph, describe
from framework.messages import from_binary
from framework.service import Service, ServiceSettings
from framework.types import Record
from framework.types import TopicPartition as OurTopicPartition
from tests.framework.sample_services import Number

ROOT = Path(__file__).resolve().parents[2]
MSA = Path(sys.executable).with_name("msa")  # the console script `pip install` made


@dataclass(frozen=True)
class Finished:
    status: int
    stdout: str
    stderr: str


async def msa(
    *args: str, env: dict[str, str] | None = None, within: float = 60, cwd: Path = ROOT
) -> Finished:
    """Run the installed `msa` command in `cwd` (without PYTHONPATH) and wait for it."""
    inherited = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = await asyncio.create_subprocess_exec(
        str(MSA),
        *args,
        cwd=cwd,
        env={**inherited, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(within):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


# -- commands -------------------------------------------------------------------------------------


async def test_help_lists_the_commands() -> None:
    done = await msa("--help")
    assert done.status == 0
    for command in ("run", "asyncapi", "openapi", "dlq"):
        assert f"    {command} " in done.stdout, done.stdout


async def test_asyncapi_prints_the_document_of_a_service() -> None:
    done = await msa("asyncapi", "tests.framework.sample_services:Shop")
    assert done.status == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "sample-shop"
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {"sample.orders", "sample.prices", "sample.accepted"}


def test_openapi_prints_the_document_of_a_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["openapi", "tests.framework.sample_services:Shop"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["openapi"] == "3.1.0"
    assert "/orders/{order_id}" in document["paths"]


async def test_a_bad_target_exits_2_with_a_message_on_stderr() -> None:
    done = await msa("asyncapi", "tests.framework.sample_services:Nope")
    assert done.status == 2
    assert done.stdout == ""
    assert done.stderr == (
        "msa: error: 'tests.framework.sample_services' has no attribute 'Nope'\n"
    ), done.stderr


@pytest.mark.parametrize(
    ("command", "target", "message"),
    [
        ("asyncapi", "no_such_module_here:Shop", "cannot import 'no_such_module_here'"),
        ("openapi", "tests.framework.sample_services", "expected 'module:attribute'"),
        ("asyncapi", "tests.framework.sample_services:Number", "is not a Service"),
        ("run", "tests.framework.sample_services:Nope", "has no attribute 'Nope'"),
    ],
)
def test_bad_targets_are_explained(
    command: str, target: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, target]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("msa: error: ")
    assert message in captured.err


def variables_read_by_the_settings() -> set[str]:
    """The environment variables `ServiceSettings.from_env` (with `transport_name` and
    `kafka_client`, which choose the transport) and the Kafka clients' settings (`KafkaSettings`,
    `ConfluentSettings`) read, found in their source: quoted `MSA_*`/`KAFKA_*` names, and the
    `get("NAME")` keys read after their `prefix` by `kafka_options_from_env`, which both
    clients' `from_env` read the variables with."""
    source = "".join(inspect.getsource(f) for f in (ServiceSettings, transport_name, kafka_client))
    names = set(re.findall(r'"((?:MSA|KAFKA)_[A-Z0-9_]+)"', source))
    for settings in (KafkaSettings, ConfluentSettings):
        assert "kafka_options_from_env(" in inspect.getsource(settings.from_env)
        assert inspect.signature(settings.from_env).parameters["prefix"].default == "KAFKA_"
    prefix = inspect.signature(kafka_options_from_env).parameters["prefix"].default
    env_source = inspect.getsource(kafka_options_from_env)
    names |= {prefix + key for key in re.findall(r'\bget\("([A-Z][A-Z0-9_]*)"\)', env_source)}
    return names


def test_run_help_lists_every_environment_variable_the_settings_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    read = variables_read_by_the_settings()
    assert {"MSA_TRANSPORT", "MSA_HTTP_PORT", "KAFKA_BOOTSTRAP", "KAFKA_SASL_PASSWORD"} <= read
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    listed = set(re.findall(r"^  ((?:MSA|KAFKA)_[A-Z0-9_]+) +\S.*\(default: .+\)$", shown, re.M))
    assert listed == read, f"missing: {read - listed}, not read: {listed - read}\n{shown}"


@pytest.mark.parametrize(
    ("command", "shows"),
    [
        ("asyncapi", '"title": "here"'),
        ("openapi", '"title": "here"'),
        ("graph", "here"),
        ("migrate", "here: no resource with migrations"),
    ],
)
async def test_target_commands_import_modules_from_the_working_directory(
    command: str, shows: str, tmp_path: Path
) -> None:
    (tmp_path / "cwd_notify.py").write_text(
        "from framework.service import Service\n\n\nclass Here(Service):\n    name = 'here'\n"
    )
    done = await msa(command, "cwd_notify:Here", cwd=tmp_path, env={"MSA_TRANSPORT": "memory"})
    assert done.status == 0, done.stderr
    assert shows in done.stdout


# -- commands other distributions add (entry points in `msa.commands`) ----------------------------


class HelloService(Service):
    name = "hello-service"


def _greeting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="world")


def _greet(args: argparse.Namespace) -> int:
    print(f"hello, {args.name}")
    return 0


def _hello_graph() -> SystemGraph:
    return describe([HelloService(ServiceSettings(http_port=-1))])


HELLO = Command(help="say hello", arguments=_greeting, run=_greet, graph=_hello_graph)
"""What a distribution's entry point points at (e.g. `hello = "tests.framework.test_cli:HELLO"`)."""
NOT_A_COMMAND = object()


def _entry_points(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    """Pretend the installed distributions declare these `msa.commands` entry points alone."""
    entries = [
        importlib.metadata.EntryPoint(name=name, value=value, group=COMMANDS_GROUP)
        for name, value in targets.items()
    ]

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        assert group == COMMANDS_GROUP
        return entries

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_an_installed_command_is_listed_parsed_and_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _entry_points(monkeypatch, hello="tests.framework.test_cli:HELLO")
    assert installed_commands() == {"hello": HELLO}
    assert main(["hello", "--name", "shop"]) == 0
    assert capsys.readouterr().out == "hello, shop\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert re.search(r"^    hello +say hello$", capsys.readouterr().out, re.M)


def test_graph_without_targets_draws_the_system_an_installed_command_registers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _entry_points(monkeypatch, hello="tests.framework.test_cli:HELLO")
    assert main(["graph"]) == 0
    assert "hello-service" in capsys.readouterr().out


def test_graph_without_targets_or_a_registered_system_says_what_to_give(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _entry_points(monkeypatch)
    assert main(["graph"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "msa: error: msa graph: name module:Service targets or --gateway "
        "(no installed command registers a system to draw)\n"
    )


@pytest.mark.parametrize("argv", [["shop"], ["shop", "--help"], ["shop", "load", "--users", "3"]])
def test_msa_shop_without_the_shop_says_how_to_install_it(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _entry_points(monkeypatch)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        "msa: error: msa shop comes with the example shop, which is not installed: "
        "pip install msa-example-shop"
    ), captured.err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert re.search(
        r"^    shop +the example shop \(not installed\)$", capsys.readouterr().out, re.M
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("hello", "tests.framework.test_cli:NOT_A_COMMAND", "not a framework.cli.Command"),
        ("run", "tests.framework.test_cli:HELLO", "msa run exists already"),
    ],
)
def test_a_bad_command_entry_point_is_named(
    name: str,
    value: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _entry_points(monkeypatch, **{name: value})
    assert main(["--help"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"msa: error: entry point {name} = {value} (group msa.commands): {message}\n"
    )


@pytest.mark.parametrize("transport", [None, "memory"])
def test_dlq_replay_refuses_the_in_memory_bus(
    transport: str | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    if transport is None:
        monkeypatch.delenv("MSA_TRANSPORT", raising=False)
    else:
        monkeypatch.setenv("MSA_TRANSPORT", transport)
    assert main(["dlq", "replay", "orders.dlq"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "msa: error: msa dlq replay needs a broker: set MSA_TRANSPORT=kafka and KAFKA_BOOTSTRAP\n"
    )


def test_dlq_replay_without_kafka_settings_says_what_is_missing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MSA_TRANSPORT", "kafka")
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    assert main(["dlq", "replay", "orders.dlq"]) == 2
    assert "KAFKA_BOOTSTRAP is not set" in capsys.readouterr().err


# -- dead letters on Kafka ------------------------------------------------------------------------


@pytest.fixture
async def rejected_records(kafka_bootstrap: str, topic_name: str) -> list[Record]:
    """Three numbers on `topic_name` that a subscription rejected into `<topic_name>.dlq`."""
    transport = KafkaTransport(
        KafkaSettings(
            bootstrap_servers=kafka_bootstrap, session_timeout_ms=6_000, heartbeat_interval_ms=200
        )
    )
    bus = Bus(transport, source="tests")
    rejected: list[int] = []
    all_rejected = asyncio.Event()

    async def reject(message: Message[Number]) -> None:
        rejected.append(message.data.n)
        if len(rejected) == 3:
            all_rejected.set()
        raise Reject(f"number {message.data.n} is void")

    bus.subscribe(
        [topic_name],
        {"sample.number": HandlerSpec(Number, reject)},
        ConsumerOptions(group=f"rejecter-{topic_name}"),
    )
    await bus.start()
    try:
        for n in range(3):
            await bus.publish(topic_name, Number(n=n), key=str(n))
        await asyncio.wait_for(all_rejected.wait(), 30)
    finally:
        await bus.stop(grace=10)  # lets the rejected records reach the dead-letter topic
    assert sorted(rejected) == [0, 1, 2]
    return await read_all(kafka_bootstrap, topic_name, count=3)


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    transport = KafkaTransport(KafkaSettings(bootstrap_servers=bootstrap))
    await transport.start()
    try:
        count = await transport.partitions_for(topic)
    finally:
        await transport.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(count)])
    finally:
        await consumer.stop()
    return {tp.partition: offset for tp, offset in ends.items()}


class _Listener:
    async def on_assigned(self, partitions: frozenset[OurTopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[OurTopicPartition]) -> None:
        return None


async def read_all(bootstrap: str, topic: str, *, count: int) -> list[Record]:
    """The first `count` records of `topic` (all partitions), waiting up to 20 s for them."""
    transport = KafkaTransport(KafkaSettings(bootstrap_servers=bootstrap))
    await transport.start()
    consumer = transport.consumer([topic], group=None, listener=_Listener())
    await consumer.start()
    records: list[Record] = []
    try:
        async with asyncio.timeout(20):
            while len(records) < count:
                records += await consumer.fetch(timeout=0.5, max_records=500)
    finally:
        await consumer.stop()
        await transport.stop()
    assert len(records) == count, f"{topic} has {len(records)} records, expected {count}"
    return records


@pytest.mark.kafka
async def test_dlq_replay_publishes_dead_letters_back_counted_and_parks_on_request(
    rejected_records: list[Record], kafka_bootstrap: str, topic_name: str
) -> None:
    dlq, parked = f"{topic_name}.dlq", f"{topic_name}.dlq.parked"
    env = {"MSA_TRANSPORT": "kafka", "KAFKA_BOOTSTRAP": kafka_bootstrap}
    dead = await read_all(kafka_bootstrap, dlq, count=3)
    assert all(r.header(DLQ_PREFIX + "error-type") == b"framework.errors.Reject" for r in dead)
    before = await end_offsets(kafka_bootstrap, topic_name)
    assert sum(before.values()) == 3

    dry = await msa("dlq", "replay", dlq, "--dry-run", env=env)
    assert dry.status == 0, dry.stderr
    listed = [line for line in dry.stdout.splitlines() if line.startswith(f"would replay {dlq}[")]
    assert len(listed) == 3, dry.stdout
    for n in range(3):
        assert any(
            line.endswith(
                f"-> {topic_name} (replay 1; framework.errors.Reject: number {n} is void)"
            )
            for line in listed
        ), dry.stdout
    assert dry.stdout.splitlines()[-1] == (
        f"would replay 3 record(s) from {dlq}; would park 0 in {parked}"
    )
    assert await end_offsets(kafka_bootstrap, topic_name) == before  # published nothing

    park = await msa("dlq", "replay", dlq, "--limit", "1", "--max-replays", "0", env=env)
    assert park.status == 0, park.stderr
    assert park.stdout.splitlines()[0].startswith(f"parked {dlq}["), park.stdout
    assert park.stdout.splitlines()[-1] == f"replayed 0 record(s) from {dlq}; parked 1 in {parked}"

    done = await msa("dlq", "replay", dlq, env=env)
    assert done.status == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"replayed 2 record(s) from {dlq}; parked 0 in {parked}"

    records = await read_all(kafka_bootstrap, topic_name, count=5)
    replayed = [r for r in records if r.offset >= before[r.partition]]
    assert len(replayed) == 2
    for record in replayed:
        assert not [name for name, _ in record.headers if name.startswith(DLQ_PREFIX)]
        assert record.header(REPLAY_COUNT) == b"1"
    [kept] = await read_all(kafka_bootstrap, parked, count=1)
    assert kept.header(DLQ_PREFIX + "error-type") == b"framework.errors.Reject"
    originals = {from_binary(r).id: (r.key, r.value) for r in rejected_records}
    assert {from_binary(r).id: (r.key, r.value) for r in [*replayed, kept]} == originals

    again = await msa("dlq", "replay", dlq, env=env)
    assert again.status == 0, again.stderr
    assert again.stdout.splitlines()[-1] == f"replayed 0 record(s) from {dlq}; parked 0 in {parked}"


@pytest.mark.postgres
async def test_migrate_applies_a_services_migrations_once(postgres_database: str) -> None:
    import asyncpg

    env = {"POSTGRES_URL": postgres_database}
    first = await msa("migrate", "tests.framework.sample_services:Ledger", env=env)
    assert first.status == 0, first.stderr
    assert "applied 2 (app:1 entries, app:2 amounts)" in first.stdout
    again = await msa("migrate", "tests.framework.sample_services:Ledger", env=env)
    assert again.status == 0, again.stderr
    assert "applied 0 (none)" in again.stdout
    conn = await asyncpg.connect(postgres_database)
    try:
        columns = await conn.fetch(
            "select column_name from information_schema.columns where table_name = 'entries'"
        )
    finally:
        await conn.close()
    assert {r["column_name"] for r in columns} == {"id", "cents"}
