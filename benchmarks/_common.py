"""What every benchmark script shares: results, targets, the table, the environment header.

A benchmark measures `Result`s; some results carry `Check`s (ours >= k x a baseline). `render`
prints them as one plain-text table with aligned columns, so a run's output can be pasted into a
README as it is.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Check",
    "Clock",
    "Result",
    "environment",
    "median",
    "percentile",
    "render",
    "require_env",
]


def require_env(name: str, hint: str) -> str:
    """The value of environment variable `name`, or exit 2 with a message saying how to set it."""
    value = os.environ.get(name, "").strip()
    if not value:
        sys.exit(f"error: {name} is not set. {hint}")
    return value


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `samples`, nearest-rank on the sorted values."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass(frozen=True, kw_only=True)
class Check:
    """A target: this result's rate must be at least `minimum` times `baseline`'s."""

    baseline: str
    """The `Result.implementation` of the same scenario to compare with."""
    minimum: float
    label: str = ""
    """How the baseline is named in the table (defaults to `baseline`)."""


@dataclass(kw_only=True)
class Result:
    """One implementation measured in one scenario."""

    scenario: str
    implementation: str
    semantics: str
    rate: float
    """Operations (messages, round trips, encode+decode pairs) per second."""
    unit: str = "msg/s"
    latencies_ms: Sequence[float] = ()
    cpu_us_per_op: float | None = None
    """Process CPU time (all threads) per operation, in microseconds."""
    baseline: bool = False
    checks: Sequence[Check] = ()
    note: str = ""
    error: str | None = None

    @property
    def p50(self) -> float | None:
        return percentile(self.latencies_ms, 50) if self.latencies_ms else None

    @property
    def p99(self) -> float | None:
        return percentile(self.latencies_ms, 99) if self.latencies_ms else None


@dataclass
class _Line:
    cells: list[str]
    verdicts: list[str] = field(default_factory=list)


_HEADER = (
    "scenario",
    "implementation",
    "semantics",
    "rate",
    "p50 ms",
    "p99 ms",
    "CPU us/op",
    "ratio",
    "target",
    "result",
)
_RIGHT = {3, 4, 5, 6, 7}


def _rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _lines(results: Sequence[Result]) -> Iterable[list[str]]:
    by_key = {(r.scenario, r.implementation): r for r in results}
    previous = None
    for result in results:
        scenario = result.scenario if result.scenario != previous else ""
        previous = result.scenario
        base = next(
            (r for r in results if r.scenario == result.scenario and r.baseline and not r.error),
            None,
        )
        if result.error:
            yield [
                scenario,
                result.implementation,
                result.semantics,
                "ERROR",
                "-",
                "-",
                "-",
                "-",
                "-",
                result.error[:60],
            ]
            continue
        if result.baseline:
            ratio = "1.00x (base)"
        elif base is not None and base.rate:
            ratio = f"{result.rate / base.rate:.2f}x"
        else:
            ratio = "-"
        cpu = "-" if result.cpu_us_per_op is None else f"{result.cpu_us_per_op:,.1f}"
        first = [
            scenario,
            result.implementation,
            result.semantics,
            _rate(result.rate, result.unit),
            _ms(result.p50),
            _ms(result.p99),
            cpu,
            ratio,
            "",
            "",
        ]
        if not result.checks:
            yield first
            continue
        for index, check in enumerate(result.checks):
            other = by_key.get((result.scenario, check.baseline))
            label = check.label or check.baseline
            if other is None or other.error or not other.rate:
                measured, verdict = "-", "n/a"
            else:
                ratio_value = result.rate / other.rate
                measured = f"{ratio_value:.2f}x {label}"
                verdict = "PASS" if ratio_value >= check.minimum else "FAIL"
            target = f">= {check.minimum:.1f}x {label}"
            if index == 0:
                first[7], first[8], first[9] = measured, target, verdict
                yield first
            else:
                yield ["", "", "", "", "", "", "", measured, target, verdict]


def render(results: Sequence[Result]) -> str:
    """The results as an aligned plain-text table (one row per result, one more per extra
    target), followed by the notes of the results that have one."""
    rows = [list(_HEADER), *(_lines(results))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]

    def fmt(row: list[str]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in _RIGHT else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    out = [fmt(rows[0]), "  ".join("-" * w for w in widths)]
    previous = None
    for row in rows[1:]:
        if row[0] and previous is not None:
            out.append("")
        previous = row[0] or previous
        out.append(fmt(row))
    notes = [f"- {r.scenario} / {r.implementation}: {r.note}" for r in results if r.note]
    if notes:
        out += ["", "Notes:", *notes]
    return "\n".join(out)


def environment(packages: Sequence[str], extra: Sequence[tuple[str, str]] = ()) -> str:
    """Lines describing the machine, Python and the versions of `packages`."""
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    lines = [
        f"Python      {platform.python_implementation()} {platform.python_version()} "
        f"on {platform.system()} {platform.machine()}, {os.cpu_count()} CPU(s)",
        *(f"{key:<11} {value}" for key, value in extra),
        f"Libraries   {', '.join(versions)}",
    ]
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class Clock:
    """Wall and process-CPU time of one measured stretch, plus how busy the whole machine was."""

    def __init__(self) -> None:
        self.wall0 = self.cpu0 = self.wall = self.cpu = 0.0
        self.machine0 = self.machine = (0, 0)

    def start(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.machine0 = _jiffies()

    def stop(self, at: float | None = None) -> None:
        self.wall = (at if at is not None else time.perf_counter()) - self.wall0
        self.cpu = time.process_time() - self.cpu0
        busy, total = _jiffies()
        self.machine = (busy - self.machine0[0], total - self.machine0[1])

    def us_per(self, ops: int) -> float:
        return self.cpu / ops * 1e6

    @property
    def machine_busy(self) -> str:
        busy, total = self.machine
        return f"{busy / total:.0%}" if total else "?"


def _jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat (zeros elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)
