"""The pytest plugin in a project of an adopter: async tests run with no asyncio configuration.

Each test writes a small project (a service and async tests that use `msa_harness`) and runs
pytest on it in a subprocess, with the plugins installed here (pytest-asyncio and this one).
"""

from __future__ import annotations

import pytest

import framework.pytest_plugin

pytest_plugins = ["pytester"]

ADOPTER_TESTS = """
from pydantic import BaseModel

from framework.messages import message_type
from framework.service import Service, handles


@message_type("adopter.ping")
class Ping(BaseModel):
    n: int


class Echo(Service):
    @handles("pings")
    async def on_ping(self, ping: Ping) -> int:
        return ping.n


async def test_the_harness_runs(msa_harness):
    async with msa_harness(Echo) as harness:
        await harness.publish("pings", Ping(n=1))
        [handled] = await harness.handled(Ping)
    assert handled.result == 1
    harness.mock(Echo.on_ping).assert_called_once_with(Ping(n=1))


async def test_on_the_chosen_transport(msa_harness, msa_transport, request):
    assert msa_transport.name == request.config.getoption("msa_transport")
    assert msa_harness(Echo).service.bus.transport is msa_transport


async def test_with_http_on_a_free_port(msa_harness):
    async with msa_harness(Echo, http_port=0) as harness:
        assert harness.service.http_port > 0
"""


def run(pytester: pytest.Pytester, ini: str, *args: str) -> pytest.RunResult:
    pytester.makeini(ini)
    pytester.makepyfile(test_adopter=ADOPTER_TESTS)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def test_async_tests_run_without_any_asyncio_configuration(pytester: pytest.Pytester) -> None:
    result = run(pytester, "[pytest]\n")

    result.assert_outcomes(passed=3)
    result.stdout.re_match_lines([r"(?i)asyncio: mode=(mode\.)?auto\b"])


def test_a_mode_the_project_chose_is_kept(pytester: pytest.Pytester) -> None:
    result = run(pytester, "[pytest]\nasyncio_mode = strict\n")

    result.stdout.re_match_lines([r"(?i)asyncio: mode=(mode\.)?strict\b"])
    assert result.parseoutcomes().get("passed", 0) == 0  # strict: unmarked async tests don't run


def test_a_mode_given_on_the_command_line_is_kept(pytester: pytest.Pytester) -> None:
    result = run(pytester, "[pytest]\n", "-o", "asyncio_mode=strict")

    result.stdout.re_match_lines([r"(?i)asyncio: mode=(mode\.)?strict\b"])


@pytest.mark.kafka
def test_msa_transport_kafka_runs_the_same_tests_on_the_broker(pytester: pytest.Pytester) -> None:
    result = run(pytester, "[pytest]\n", "--msa-transport=kafka")

    result.assert_outcomes(passed=3)


def test_msa_transport_kafka_without_a_broker_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)

    result = run(pytester, "[pytest]\n", "--msa-transport=kafka")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--msa-transport=kafka: KAFKA_BOOTSTRAP is not set*"])


def test_the_docstring_shows_transport_http_port_and_the_asyncio_mode() -> None:
    doc = framework.pytest_plugin.__doc__ or ""
    assert "msa_harness(Shipping, transport=KafkaTransport(" in doc
    assert "msa_harness(Shipping, http_port=0)" in doc
    assert 'asyncio_mode = "auto"' in doc
    assert "@pytest.mark.asyncio" in doc
    assert "--msa-transport=kafka" in doc


CLIENT_TESTS = """
import os

from framework.bus.confluent import ConfluentTransport
from framework.bus.kafka import KafkaTransport


def test_the_client_kafka_client_names(msa_transport):
    expected = {"confluent": ConfluentTransport}.get(os.environ.get("KAFKA_CLIENT"), KafkaTransport)
    assert type(msa_transport) is expected
    assert msa_transport.name == "kafka"
    assert msa_transport.settings.bootstrap_servers == "127.0.0.1:9"
"""


@pytest.mark.parametrize("client", ["confluent", "aiokafka", ""])
def test_msa_transport_kafka_builds_the_client_kafka_client_names(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    # The transport is only built, never started: no broker is needed at this address.
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:9")
    monkeypatch.setenv("KAFKA_CLIENT", client)
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_client=CLIENT_TESTS)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--msa-transport=kafka")

    result.assert_outcomes(passed=1)


def test_msa_transport_kafka_with_an_unknown_client_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:9")
    monkeypatch.setenv("KAFKA_CLIENT", "kafka-python")

    result = run(pytester, "[pytest]\n", "--msa-transport=kafka")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--msa-transport=kafka: KAFKA_CLIENT must be *'kafka-python'*"])


def test_msa_transport_kafka_with_a_malformed_bootstrap_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "nohost")
    monkeypatch.setenv("KAFKA_CLIENT", "confluent")

    result = run(pytester, "[pytest]\n", "--msa-transport=kafka")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--msa-transport=kafka: KAFKA_BOOTSTRAP='nohost'*not host:port*"])


def test_the_docstring_tells_kafka_client_picks_the_client() -> None:
    doc = framework.pytest_plugin.__doc__ or ""
    assert "KAFKA_CLIENT=confluent" in doc
    assert "transport_from_env" in doc
