"""`msa shop load`: Locust, headless, against the running shop; then the report of what it did.

    msa shop load --users 20 --duration 30s            the text report
    msa shop load --users 20 --duration 30s --json     one JSON object, nothing else on stdout

Locust is the load tool users know; the locustfile next to this module describes browsing and
buying users. This module runs it headless as a subprocess and has it record every request in
a run log (`runlog`); once Locust has exited, it reads the statuses of the orders the run placed
until they are final, for at most 30 s (`orders`), and reports (`report`):

- requests and requests/s, per endpoint and in all, over the measured time: from the first
  request sent to the last answer received;
- per endpoint, p50/p95/p99 latency and the answers by class: 2xx, 4xx, 429 (rate-limited by
  the gateway, by design), 5xx, circuit open (the gateway's breaker answered 503), no answer;
- orders placed (checkouts answered 202; a 409 or any other answer is reported, never counted)
  and placed/s; orders completed (confirmed or cancelled), confirmed, cancelled, failed, still
  pending, and completed/s from the first placed to the last completed.

The run lasts `duration` from the moment Locust starts its users (its start-up is not counted),
and users are spawned fast enough that all have started within the first half of it (the spawn
rate is raised when needed: a 2 s run with 20 users spawns 20 per second). While it runs, a
progress bar is drawn on a terminal, and only on one.

The exit status is 0 when the report shows no problem, 1 when it does (5xx, circuit-open or
unanswered requests, orders failed, pending or unread), 2 when there is no report (Locust
failed, or never started the test).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TextIO

from example_shop.load.orders import SETTLE_TIMEOUT, settle_orders
from example_shop.load.report import LoadReport, summarize
from example_shop.load.runlog import RUN_LOG_ENV, RunLog

__all__ = ["LoadReport", "parse_duration", "run_load", "spawn_rate_for"]

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
STOP_TIMEOUT = 10.0
"""Seconds a user has, once the run time is over, to finish its task: a checkout sent is
answered, so every order the shop placed is one the report knows."""
START_ALLOWANCE = 120.0
"""Seconds Locust may take to start (and to stop) before it is stopped."""


def parse_duration(text: str) -> float:
    """Locust's `30s`, `2m`, `1h30m` in seconds."""
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)([hms]?)", text):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
    if total <= 0:
        raise ValueError(f"not a duration: {text!r}")
    return total


def spawn_rate_for(users: int, spawn_rate: float, seconds: float) -> float:
    """`spawn_rate`, or the rate that starts all `users` within the first half of the run."""
    return max(spawn_rate, users / (seconds / 2))


def run_load(
    *, host: str, users: int, spawn_rate: float, duration: str, json_output: bool = False
) -> int:
    """Load the shop at `host` with `users` Locust users for `duration`; print the report."""
    seconds = parse_duration(duration)
    host = host.rstrip("/")
    rate = spawn_rate_for(users, spawn_rate, seconds)
    progress = _Progress(sys.stderr if json_output else sys.stdout)
    with tempfile.TemporaryDirectory(prefix="msa-load-") as directory:
        run_log = Path(directory) / "run.jsonl"
        errors = Path(directory) / "locust.err"
        with errors.open("wb") as stderr:
            returncode = _run_locust(host, users, rate, seconds, run_log, stderr, progress)
        log = RunLog.read(run_log) if run_log.exists() else RunLog()
        if returncode not in (0, 1) or log.started_at is None:
            progress.done()
            error = errors.read_text(errors="replace")
            print(f"locust failed ({returncode}): {error[-2000:]}", file=sys.stderr)
            return 2
    placed = [r.order_id for r in log.requests if r.order_id is not None]
    settlement = settle_orders(
        host,
        placed,
        timeout=SETTLE_TIMEOUT,
        on_round=lambda left: progress.show(f"waiting for {left} of {len(placed)} orders"),
    )
    progress.done()
    report = summarize(
        log,
        settlement,
        host=host,
        users=users,
        spawn_rate=rate,
        spawn_rate_asked=spawn_rate,
        duration_s=seconds,
    )
    if json_output:
        print(json.dumps(report.as_json()))
    else:
        print(report.render())
    return 1 if report.problems else 0


def _run_locust(
    host: str,
    users: int,
    rate: float,
    seconds: float,
    run_log: Path,
    stderr: IO[bytes],
    progress: _Progress,
) -> int:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--users",
        str(users),
        "--spawn-rate",
        f"{rate:g}",
        "--msa-seconds",
        f"{seconds:g}",
        "--stop-timeout",
        f"{STOP_TIMEOUT:g}",
        "--only-summary",
        "--loglevel",
        "ERROR",
    ]
    env = {**os.environ, RUN_LOG_ENV: str(run_log)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    began = time.monotonic()
    started: float | None = None
    try:
        while process.poll() is None:
            now = time.monotonic()
            if started is None and run_log.exists() and run_log.stat().st_size:
                started = now
            if now - began > seconds + STOP_TIMEOUT + START_ALLOWANCE:
                process.terminate()  # Locust's SIGTERM handler stops the run and reports
                with contextlib.suppress(subprocess.TimeoutExpired):  # then killed below
                    process.wait(timeout=STOP_TIMEOUT * 2)
                break
            if started is None:
                progress.show(f"starting Locust: {users} users against {host}")
            elif now - started < seconds:
                progress.bar((now - started) / seconds, f"{users} users against {host}")
            else:
                progress.show(
                    f"stopping Locust: the users finish their tasks (up to {STOP_TIMEOUT:g} s)"
                )
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode


class _Progress:
    """A progress line redrawn in place, on a terminal only (no frames in a pipe or a file)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.drawn = False

    def show(self, text: str) -> None:
        if self.live:
            self.stream.write(f"\r\x1b[2K{text}")
            self.stream.flush()
            self.drawn = True

    def bar(self, done: float, text: str) -> None:
        self.show(f"[{'#' * int(done * 40):<40}] {done:4.0%}  {text}")

    def done(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.drawn = False
