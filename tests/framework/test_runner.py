"""`msa run` as a real process on a real Kafka: crash recovery, graceful SIGTERM, JSON logs.

Each test starts `python -m framework.cli run tests.framework.sample_services:<Service>` with
`MSA_TRANSPORT=kafka`; the sample services append what they handle to `SAMPLE_OUTPUT`, flushed
and fsynced per record, so the file is the truth about what a process did before it died.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.messages import Envelope, to_binary, type_name
from framework.observability.tracing import TraceContext
from tests.framework.sample_services import Number

ROOT = Path(__file__).resolve().parents[2]
GRACE = 10.0


@dataclass
class ServiceProcess:
    label: str
    process: asyncio.subprocess.Process
    stderr: Path

    def logs(self, last: int = 30) -> str:
        lines = self.stderr.read_text(errors="replace").splitlines()
        return f"--- last stderr lines of {self.label} ---\n" + "\n".join(lines[-last:])

    async def exit_status(self, within: float) -> int:
        try:
            async with asyncio.timeout(within):
                return await self.process.wait()
        except TimeoutError:
            pytest.fail(f"{self.label} did not exit within {within}s\n{self.logs()}")


Spawn = Callable[..., Awaitable[ServiceProcess]]


@pytest.fixture
async def spawn(topic_name: str, tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start `msa run tests.framework.sample_services:<service>` on Kafka (`KAFKA_BOOTSTRAP` of
    this environment); kills what is still running afterwards."""
    started: list[ServiceProcess] = []

    async def start(service: str, label: str, **sample_env: str) -> ServiceProcess:
        env = {
            **os.environ,
            "MSA_TRANSPORT": "kafka",
            "MSA_HTTP_PORT": "-1",
            "MSA_SHUTDOWN_GRACE": str(GRACE),
            "SAMPLE_TOPIC": topic_name,
            **sample_env,
        }
        stderr = tmp_path / f"{label}.stderr"
        with stderr.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "framework.cli",
                "run",
                f"tests.framework.sample_services:{service}",
                env=env,
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        started.append(ServiceProcess(label, process, stderr))
        return started[-1]

    try:
        yield start
    finally:
        for service in started:
            if service.process.returncode is None:
                service.process.kill()
            await service.process.wait()


def output_lines(path: Path) -> list[list[str]]:
    """The complete lines of a sample service's output file, split into fields."""
    if not path.exists():
        return []
    text = path.read_text()
    return [line.split() for line in text[: text.rfind("\n") + 1].splitlines()]


async def wait_until(
    condition: Callable[[], bool], *, within: float, what: str, service: ServiceProcess
) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if service.process.returncode is not None:
            pytest.fail(
                f"{service.label} exited with {service.process.returncode} before {what}\n"
                + service.logs()
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}\n{service.logs()}")
        await asyncio.sleep(0.02)


async def publish_numbers(
    bootstrap: str,
    topic: str,
    numbers: Iterable[int],
    *,
    partitions: int | None = None,
    correlation_id: str | None = None,
    traceparent: str | None = None,
) -> None:
    """Publish `Number` events keyed by the number (or round-robin over `partitions`)."""
    transport = KafkaTransport(KafkaSettings(bootstrap_servers=bootstrap))
    await transport.start()
    try:
        acks = []
        for n in numbers:
            envelope = Envelope(
                type=type_name(Number),
                source="tests",
                data=Number(n=n),
                partitionkey=str(n),
                correlationid=correlation_id,
                traceparent=traceparent,
            )
            key, value, headers = to_binary(envelope)
            partition = None if partitions is None else n % partitions
            acks.append(
                await transport.send(topic, value, key=key, headers=headers, partition=partition)
            )
        await asyncio.gather(*acks)
    finally:
        await transport.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


# -- crash recovery -------------------------------------------------------------------------------


@pytest.mark.kafka
async def test_a_killed_service_loses_nothing_and_redoes_only_the_last_records(
    spawn: Spawn,
    kafka_bootstrap: str,
    topic_name: str,
    tmp_path: Path,
) -> None:
    total = 300
    await publish_numbers(kafka_bootstrap, topic_name, range(total))
    first_output, second_output = tmp_path / "first.txt", tmp_path / "second.txt"

    first = await spawn(
        "NumberRecorder", "first", SAMPLE_OUTPUT=str(first_output), SAMPLE_DELAY="0.01"
    )
    await wait_until(
        lambda: len(output_lines(first_output)) >= 100,
        within=60,
        what="the first process to record 100 numbers",
        service=first,
    )
    first.process.send_signal(signal.SIGKILL)
    assert await first.exit_status(within=10) == -signal.SIGKILL
    by_first = [(int(n), int(p), int(o)) for n, p, o in output_lines(first_output)]
    assert 100 <= len(by_first) < total, "the first process was not killed mid-stream"

    second = await spawn("NumberRecorder", "second", SAMPLE_OUTPUT=str(second_output))

    def everything_recorded() -> bool:
        seen = {n for n, _, _ in by_first} | {int(f[0]) for f in output_lines(second_output)}
        return len(seen) == total

    await wait_until(
        everything_recorded, within=60, what="all numbers to be recorded", service=second
    )
    second.process.send_signal(signal.SIGTERM)
    assert await second.exit_status(within=GRACE + 5) == 0
    by_second = [(int(n), int(p), int(o)) for n, p, o in output_lines(second_output)]

    # At least once: every number was recorded, none by one process twice.
    assert {n for n, _, _ in by_first} | {n for n, _, _ in by_second} == set(range(total))
    assert not [n for n, c in Counter(n for n, _, _ in by_first).items() if c > 1]
    assert not [n for n, c in Counter(n for n, _, _ in by_second).items() if c > 1]

    # The second process resumed each partition where the first had committed: everything
    # below was done by the first; what it redid is the last stretch the first handled there.
    redone = {n for n, _, _ in by_first} & {n for n, _, _ in by_second}
    for partition in {p for _, p, _ in by_first}:
        first_here = [(n, o) for n, p, o in by_first if p == partition]
        second_here = sorted(o for _, p, o in by_second if p == partition)
        resumed_at = second_here[0] if second_here else max(o for _, o in first_here) + 1
        assert second_here == list(range(resumed_at, resumed_at + len(second_here)))
        assert {o for _, o in first_here if o < resumed_at} == set(range(resumed_at))
        flags = [n in redone for n, _ in first_here]  # in the order the first handled them
        assert flags == sorted(flags), f"partition {partition}: a redone record is not recent"
    assert len(redone) <= 50, f"{len(redone)} records redone: commits lagged far behind"


# -- graceful stop --------------------------------------------------------------------------------


@pytest.mark.kafka
async def test_sigterm_finishes_running_handlers_commits_and_exits_0(
    spawn: Spawn,
    kafka_bootstrap: str,
    topic_name: str,
    tmp_path: Path,
) -> None:
    partitions, total = 3, 9
    await publish_numbers(kafka_bootstrap, topic_name, range(total), partitions=partitions)
    first_output, second_output = tmp_path / "first.txt", tmp_path / "second.txt"

    # A grace far longer than the wait for the exit below: stopping must not wait it out.
    first = await spawn(
        "SlowWorker",
        "first",
        SAMPLE_OUTPUT=str(first_output),
        SAMPLE_DELAY="1",
        MSA_SHUTDOWN_GRACE="3600",
    )
    await wait_until(
        lambda: any(f[0] == "start" for f in output_lines(first_output)),
        within=60,
        what="a handler to start",
        service=first,
    )
    first.process.send_signal(signal.SIGTERM)
    assert await first.exit_status(within=60) == 0, first.logs()

    lines = output_lines(first_output)
    started = {(int(n), int(p), int(o)) for step, n, p, o in lines if step == "start"}
    done = {(int(n), int(p), int(o)) for step, n, p, o in lines if step == "done"}
    assert started, "nothing had started"
    assert done == started, "a handler running at SIGTERM did not finish"
    per_partition = Counter(p for _, p, _ in started)
    assert max(per_partition.values()) == 1, f"records started after SIGTERM: {sorted(started)}"

    committed = await committed_offsets(kafka_bootstrap, "sample-slow", topic_name)
    for partition in range(partitions):
        done_here = sorted(o for _, p, o in done if p == partition)
        assert done_here == list(range(len(done_here)))
        # Every record done is committed; the first one not done is not.
        assert committed.get(partition, 0) == len(done_here), (committed, sorted(done))

    second = await spawn(
        "SlowWorker", "second", SAMPLE_OUTPUT=str(second_output), SAMPLE_DELAY="0.05"
    )
    remaining = set(range(total)) - {n for n, _, _ in done}

    def rest_done() -> bool:
        return {int(f[1]) for f in output_lines(second_output) if f[0] == "done"} >= remaining

    await wait_until(rest_done, within=60, what="the rest to be done", service=second)
    second.process.send_signal(signal.SIGTERM)
    assert await second.exit_status(within=GRACE + 5) == 0
    redone = {int(f[1]) for f in output_lines(second_output)} & {n for n, _, _ in done}
    assert not redone, f"the restarted process redid {sorted(redone)}"


# -- logs -----------------------------------------------------------------------------------------


@pytest.mark.kafka
async def test_logs_are_json_lines_carrying_the_message_context(
    spawn: Spawn,
    kafka_bootstrap: str,
    topic_name: str,
    tmp_path: Path,
) -> None:
    trace = TraceContext.new_root()
    await publish_numbers(
        kafka_bootstrap,
        topic_name,
        [7],
        correlation_id="checkout-7",
        traceparent=trace.to_header(),
    )
    output = tmp_path / "out.txt"
    service = await spawn("NumberRecorder", "logs", SAMPLE_OUTPUT=str(output), MSA_HTTP_PORT="0")
    await wait_until(
        lambda: bool(output_lines(output)), within=60, what="the number", service=service
    )
    service.process.send_signal(signal.SIGTERM)
    assert await service.exit_status(within=GRACE + 5) == 0

    text = service.stderr.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(line["service"] == "sample-recorder" for line in lines)
    messages = [line["message"] for line in lines]
    assert any(m.startswith("service sample-recorder started") for m in messages)
    assert "service sample-recorder stopped" in messages
    assert any(m.startswith("service sample-recorder: HTTP on") for m in messages)
    [recorded] = [line for line in lines if line["message"] == "recorded number 7"]
    assert recorded["correlation_id"] == "checkout-7"
    assert recorded["trace_id"] == trace.trace_id
    assert recorded["logger"] == "tests.sample"
    assert recorded["level"] == "INFO"


@pytest.mark.kafka
async def test_a_second_signal_during_the_stop_exits_130_at_once(
    spawn: Spawn, kafka_bootstrap: str, topic_name: str, tmp_path: Path
) -> None:
    await publish_numbers(kafka_bootstrap, topic_name, [1])
    output = tmp_path / "out.txt"
    service = await spawn("ImpatientWorker", "twice", SAMPLE_OUTPUT=str(output), SAMPLE_DELAY="30")
    await wait_until(
        lambda: bool(output_lines(output)), within=60, what="the handler to start", service=service
    )
    service.process.send_signal(signal.SIGTERM)
    await wait_until(
        lambda: "stopping" in service.stderr.read_text(),
        within=10,
        what="the stop to begin",
        service=service,
    )
    service.process.send_signal(signal.SIGINT)
    assert await service.exit_status(within=5) == 130
    assert [f[0] for f in output_lines(output)] == ["start"]  # the handler was not waited for


async def test_a_service_that_fails_to_start_exits_1_and_logs_why(
    spawn: Spawn, tmp_path: Path
) -> None:
    service = await spawn("BrokenAtStart", "broken", MSA_TRANSPORT="memory")
    assert await service.exit_status(within=30) == 1
    lines = [json.loads(line) for line in service.stderr.read_text().splitlines() if line]
    [failure] = [line for line in lines if line["level"] == "ERROR"]
    assert failure["message"] == "service sample-broken failed to start"
    assert "the search index is unreachable" in failure["exception"]


# -- targets in the working directory -------------------------------------------------------------


async def test_msa_run_imports_the_service_from_the_working_directory(tmp_path: Path) -> None:
    """The installed `msa` script (not `python -m`, which would put the directory on `sys.path`
    itself), started next to the module, without PYTHONPATH."""
    (tmp_path / "cwd_notify.py").write_text(
        "from framework.service import Service\n\n\n"
        "class Notify(Service):\n"
        "    name = 'notify'\n\n"
        "    async def on_start(self) -> None:\n"
        "        print('started', flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"MSA_TRANSPORT": "memory", "MSA_HTTP_PORT": "-1"}
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("msa")),
        "run",
        "cwd_notify:Notify",
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            started = await process.stdout.readline()
            if started == b"started\n":
                process.send_signal(signal.SIGTERM)
            _, stderr = await process.communicate()
        assert started == b"started\n", stderr.decode()
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
