"""JSON log lines: fixed fields, context from the contextvars, extras, exceptions, configuration."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from framework.errors import ConfigurationError
from framework.observability.logging import JsonFormatter, TextFormatter, configure_logging
from framework.observability.tracing import (
    TraceContext,
    use_correlation_id,
    use_service,
    use_trace,
)

TRACE = TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
RFC3339_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def log(stream: io.StringIO) -> Iterator[logging.Logger]:
    """A private logger writing JSON for service "orders" into `stream`."""
    logger = logging.getLogger("tests.observability.json")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("orders"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger
    logger.removeHandler(handler)
    logger.propagate = True


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, with its handlers and level restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [orjson.loads(line) for line in text.splitlines()]


def test_a_line_has_time_level_logger_message_and_service(
    log: logging.Logger, stream: io.StringIO
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    log.warning("stock low for %s: %d left", "sku-1", 3)

    [line] = lines(stream)

    assert list(line) == ["time", "level", "logger", "message", "service"]
    assert RFC3339_MS_UTC.fullmatch(line["time"]), line["time"]
    logged = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert before <= logged <= datetime.now(UTC)
    assert line["level"] == "WARNING"
    assert line["logger"] == "tests.observability.json"
    assert line["message"] == "stock low for sku-1: 3 left"
    assert line["service"] == "orders"


def test_time_carries_the_records_milliseconds() -> None:
    formatter = JsonFormatter("orders")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.created, record.msecs = 1_764_057_600.042, 42.0  # 2025-11-25T08:00:00.042Z

    assert orjson.loads(formatter.format(record))["time"] == "2025-11-25T08:00:00.042Z"
    record.created, record.msecs = 1_764_057_601.5, 500.0
    assert orjson.loads(formatter.format(record))["time"] == "2025-11-25T08:00:01.500Z"


def test_correlation_and_trace_ids_come_from_the_contextvars(
    log: logging.Logger, stream: io.StringIO
) -> None:
    with use_correlation_id("corr-17"), use_trace(TRACE):
        log.info("inside")
    log.info("outside")

    inside, outside = lines(stream)

    assert inside["correlation_id"] == "corr-17"
    assert inside["trace_id"] == TRACE.trace_id
    assert inside["span_id"] == TRACE.span_id
    for field in ("correlation_id", "trace_id", "span_id"):
        assert field not in outside


def test_the_current_service_names_the_line(log: logging.Logger, stream: io.StringIO) -> None:
    with use_service("payments"):
        log.info("inside")
    log.info("outside")

    inside, outside = lines(stream)

    assert inside["service"] == "payments"  # e.g. one of several services of `msa shop`
    assert outside["service"] == "orders"  # the name the formatter was configured with


def test_extra_ids_win_over_the_contextvars(log: logging.Logger, stream: io.StringIO) -> None:
    with use_correlation_id("from-context"):
        log.info("stamped", extra={"correlation_id": "from-extra", "trace_id": "t" * 32})

    [line] = lines(stream)

    assert line["correlation_id"] == "from-extra"
    assert line["trace_id"] == "t" * 32


def test_extras_are_copied_but_standard_attributes_are_not(
    log: logging.Logger, stream: io.StringIO
) -> None:
    log.info("order placed", extra={"order_id": "o-17", "total": 12.5, "items": [1, 2]})

    [line] = lines(stream)

    assert line["order_id"] == "o-17"
    assert line["total"] == 12.5
    assert line["items"] == [1, 2]
    for standard in ("msg", "args", "lineno", "pathname", "levelno", "created", "thread"):
        assert standard not in line


def test_extras_cannot_replace_fixed_fields(log: logging.Logger, stream: io.StringIO) -> None:
    log.info("hello", extra={"service": "impostor", "level": "NONE", "time": "never"})

    [line] = lines(stream)

    assert line["service"] == "orders"
    assert line["level"] == "INFO"
    assert line["time"] != "never"


def test_values_orjson_cannot_encode_are_written_as_text(
    log: logging.Logger, stream: io.StringIO
) -> None:
    class Money:
        def __str__(self) -> str:
            return "12.50 EUR"

    log.info("odd values", extra={"amount": Money(), "huge": 2**70})

    [line] = lines(stream)

    assert line["amount"] == "12.50 EUR"
    assert line["huge"] == str(2**70)
    assert line["message"] == "odd values"


def test_multiline_messages_stay_on_one_line(log: logging.Logger, stream: io.StringIO) -> None:
    log.info("first\nsecond")

    assert stream.getvalue().count("\n") == 1
    assert lines(stream)[0]["message"] == "first\nsecond"


def test_exceptions_are_written_with_their_traceback(
    log: logging.Logger, stream: io.StringIO
) -> None:
    def fail() -> None:
        raise ValueError("payment declined")

    try:
        fail()
    except ValueError:
        log.exception("charge failed", extra={"order_id": "o-1"})

    [line] = lines(stream)

    assert line["level"] == "ERROR"
    assert line["message"] == "charge failed"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "in fail" in line["exception"]
    assert line["exception"].endswith("ValueError: payment declined")
    assert line["order_id"] == "o-1"


def test_stack_info_is_written(log: logging.Logger, stream: io.StringIO) -> None:
    log.info("where am I", stack_info=True)

    [line] = lines(stream)

    assert line["stack"].startswith("Stack (most recent call last):")
    assert "test_stack_info_is_written" in line["stack"]


def _service_handlers(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if type(h).__name__ == "_ServiceLogHandler"]


def test_configure_logging_is_idempotent(root_logger: logging.Logger) -> None:
    other = logging.NullHandler()
    root_logger.addHandler(other)
    first_stream, second_stream = io.StringIO(), io.StringIO()

    first = configure_logging("orders", stream=first_stream, level="INFO", json=True)
    second = configure_logging("payments", stream=second_stream, level="INFO", json=True)
    logging.getLogger("tests.observability.configured").info("once")

    assert _service_handlers(root_logger) == [second]
    assert first not in root_logger.handlers
    assert other in root_logger.handlers
    assert first_stream.getvalue() == ""
    [line] = lines(second_stream)
    assert line["service"] == "payments"
    assert line["message"] == "once"


def test_configure_logging_sets_the_root_level(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("orders", stream=stream, level="warning", json=True)

    logging.getLogger("tests.observability.level").info("dropped")
    logging.getLogger("tests.observability.level").warning("kept")

    assert root_logger.level == logging.WARNING
    assert [line["message"] for line in lines(stream)] == ["kept"]


def test_configure_logging_reads_the_environment(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MSA_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MSA_LOG_FORMAT", "text")

    handler = configure_logging("orders", stream=io.StringIO())

    assert root_logger.level == logging.DEBUG
    assert isinstance(handler.formatter, TextFormatter)


def test_arguments_win_over_the_environment(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MSA_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MSA_LOG_FORMAT", "text")

    handler = configure_logging("orders", stream=io.StringIO(), level="ERROR", json=True)

    assert root_logger.level == logging.ERROR
    assert isinstance(handler.formatter, JsonFormatter)


def test_defaults_without_environment_are_info_and_json(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MSA_LOG_LEVEL", raising=False)
    monkeypatch.delenv("MSA_LOG_FORMAT", raising=False)

    handler = configure_logging("orders", stream=io.StringIO())

    assert root_logger.level == logging.INFO
    assert isinstance(handler.formatter, JsonFormatter)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [("MSA_LOG_LEVEL", "LOUD", "unknown log level"), ("MSA_LOG_FORMAT", "xml", "log format")],
)
def test_bad_environment_values_are_configuration_errors(
    root_logger: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError, match=message):
        configure_logging("orders", stream=io.StringIO())
    assert _service_handlers(root_logger) == []


def test_text_format_carries_the_same_context(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("orders", stream=stream, level="INFO", json=False)

    with use_correlation_id("corr-9"), use_trace(TRACE):
        logging.getLogger("tests.observability.text").info("readable")

    text = stream.getvalue()
    assert text.endswith(
        f"INFO tests.observability.text [orders correlation_id=corr-9 "
        f"trace_id={TRACE.trace_id}] readable\n"
    )


def test_text_format_names_the_current_service(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("shop", stream=stream, level="INFO", json=False)

    with use_service("payments"):
        logging.getLogger("tests.observability.text").info("readable")

    assert stream.getvalue().endswith("INFO tests.observability.text [payments] readable\n")
