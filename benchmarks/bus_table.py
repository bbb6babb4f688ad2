"""The rows of `bus.py`'s table: samples from interleaved rounds, their medians, the targets.

A `Row` is one implementation in one scenario with the settings it ran with (`producer`) and the
work it did (`semantics`, `payload`). Each round adds one `Sample` to every row of a scenario, in
turn, so a neighbour's burst of load spreads over all rows rather than hitting one; the table
shows the median of the rounds and their spread. A row that could not run (a transport or
library that is not installed) says why in place of its numbers; it is not an error.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Row", "Sample", "Target", "Variant", "render"]


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One round of one row: operations per second and process CPU per operation."""

    rate: float
    cpu_us: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class Target:
    """A goal for a row: a rate at least `minimum` x another row's (`baseline`, the
    implementation name in the same scenario), or a median latency at most `max_p50_ms`."""

    baseline: str | None = None
    minimum: float = 0.0
    max_p50_ms: float | None = None
    label: str = ""
    across_payloads: bool = False
    """The comparison is between payload libraries by design (each row names its own)."""

    def describe(self) -> str:
        if self.max_p50_ms is not None:
            return f"p50 <= {self.max_p50_ms:g} ms"
        return f">= {self.minimum:g}x {self.label or self.baseline}"


@dataclass(kw_only=True)
class Row:
    scenario: str
    implementation: str
    producer: str
    """The producer settings (or consumer commit settings) the row ran with, spelled out."""
    semantics: str
    """The work done per operation and the delivery guarantee."""
    payload: str = "pydantic"
    unit: str = "msg/s"
    baseline: bool = False
    targets: Sequence[Target] = ()
    samples: list[Sample] = field(default_factory=list)
    unavailable: str | None = None
    errors: list[str] = field(default_factory=list)

    def median(self, attribute: str) -> float | None:
        values = [getattr(s, attribute) for s in self.samples]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    @property
    def rate(self) -> float | None:
        return self.median("rate")

    @property
    def spread(self) -> str:
        rates = [s.rate for s in self.samples]
        if len(rates) < 2:
            return ""
        middle = statistics.median(rates)
        return f"+-{(max(rates) - min(rates)) / 2 / middle:.0%}" if middle else ""


@dataclass(kw_only=True)
class Variant:
    """What one round runs for its rows: one `Sample` per row, in the rows' order."""

    rows: list[Row]
    run: Callable[[], Awaitable[list[Sample]]] | None


_HEADER = (
    "scenario",
    "implementation",
    "settings",
    "work / delivery",
    "payload",
    "rate (median)",
    "spread",
    "p50 ms",
    "p99 ms",
    "CPU us/op",
    "measured",
    "target",
    "result",
)
_RIGHT = {5, 6, 7, 8, 9}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _verdicts(row: Row, rows: Sequence[Row]) -> list[tuple[str, str, str]]:
    """(measured, target, PASS/FAIL/n/a) for each of the row's targets."""
    out = []
    for target in row.targets:
        if target.max_p50_ms is not None:
            p50 = row.median("p50_ms")
            if p50 is None:
                out.append(("-", target.describe(), "n/a"))
            else:
                verdict = "PASS" if p50 <= target.max_p50_ms else "FAIL"
                out.append((f"p50 {p50:.2f} ms", target.describe(), verdict))
            continue
        other = next(
            (r for r in rows if r.scenario == row.scenario and r.implementation == target.baseline),
            None,
        )
        mine = row.rate
        theirs = other.rate if other is not None else None
        if mine is None or not theirs or other is None:
            out.append(("-", target.describe(), "n/a"))
        elif other.payload != row.payload and not target.across_payloads:
            out.append(("-", target.describe(), "n/a (unequal payload)"))
        else:
            ratio = mine / theirs
            verdict = "PASS" if ratio >= target.minimum else "FAIL"
            out.append((f"{ratio:.2f}x", target.describe(), verdict))
    return out


def _lines(rows: Sequence[Row]) -> list[list[str]]:
    lines: list[list[str]] = []
    previous = None
    for row in rows:
        scenario = row.scenario if row.scenario != previous else ""
        previous = row.scenario
        head = [scenario, row.implementation, row.producer, row.semantics, row.payload]
        if row.unavailable is not None or not row.samples:
            why = row.unavailable or ("ERROR: " + "; ".join(row.errors))[:70]
            lines.append([*head, "-", "", "-", "-", "-", "", "", why])
            continue
        rate = row.rate or 0.0
        base = "(baseline)" if row.baseline else ""
        numbers = [
            f"{rate:,.0f} {row.unit}",
            row.spread,
            _ms(row.median("p50_ms")),
            _ms(row.median("p99_ms")),
            f"{row.median('cpu_us') or 0:,.1f}",
        ]
        verdicts = _verdicts(row, rows)
        if row.errors:
            verdicts.append(("", "", f"{len(row.errors)} round(s) failed"))
        if not verdicts:
            lines.append([*head, *numbers, base, "", ""])
            continue
        for index, (measured, target, verdict) in enumerate(verdicts):
            if index == 0:
                lines.append([*head, *numbers, measured, target, verdict])
            else:
                lines.append([""] * 10 + [measured, target, verdict])
    return lines


def render(rows: Sequence[Row]) -> str:
    """The rows as one aligned plain-text table (scenarios separated by a blank line), then the
    notes the samples carry and the failed rounds."""
    table = [list(_HEADER), *_lines(rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADER))]

    def fmt(line: list[str]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in _RIGHT else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        return "  ".join(cells).rstrip()

    out = [fmt(table[0]), "  ".join("-" * w for w in widths)]
    for line in table[1:]:
        if line[0] and len(out) > 2:
            out.append("")
        out.append(fmt(line))
    notes = []
    for row in rows:
        seen = sorted({s.note for s in row.samples if s.note})
        if seen:
            notes.append(f"- {row.scenario} / {row.implementation}: {' | '.join(seen)}")
        notes += [f"- {row.scenario} / {row.implementation}: ERROR {e}" for e in row.errors]
    if notes:
        out += ["", "Notes:", *notes]
    return "\n".join(out)
