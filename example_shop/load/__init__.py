"""`msa shop load`: Locust, headless, against the running shop, with a progress bar and a table.

Locust is the load tool users know; the locustfile next to this module describes browsing and
buying users. This module runs it headless as a subprocess for `--duration`, draws a progress
bar meanwhile, then reads Locust's CSV statistics and prints one summary table: requests,
requests/s, orders/s, p50/p95/p99 and errors per endpoint.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["parse_duration", "run_load", "summarize"]

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_duration(text: str) -> float:
    """Locust's `30s`, `2m`, `1h30m` in seconds."""
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)([hms]?)", text):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
    if total <= 0:
        raise ValueError(f"not a duration: {text!r}")
    return total


def summarize(stats_csv: Path, seconds: float) -> str:
    """The summary table of a Locust `*_stats.csv`."""
    with stats_csv.open() as stats:
        rows = list(csv.DictReader(stats))
    lines = [
        f"{'endpoint':<32} {'requests':>9} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'errors':>7}"
    ]
    orders = limited = 0
    for row in rows:
        name = row["Name"] if row["Name"] != "Aggregated" else "all requests"
        if row["Type"] == "ORDER":
            orders = int(row["Request Count"])
            continue
        if row["Type"] == "LIMITED":
            limited = int(row["Request Count"])
            continue
        lines.append(
            f"{name[:32]:<32} {int(row['Request Count']):>9} {float(row['Requests/s']):>8.1f} "
            f"{row['50%']:>7} {row['95%']:>7} {row['99%']:>7} {int(row['Failure Count']):>7}"
        )
    lines.append(
        f"\norders placed: {orders} ({orders / seconds:.2f} orders/s over {seconds:.0f} s)"
    )
    lines.append(f"rate-limited by the gateway (429s, answered as designed): {limited}")
    return "\n".join(lines)


def run_load(*, host: str, users: int, spawn_rate: float, duration: str) -> int:
    seconds = parse_duration(duration)
    with tempfile.TemporaryDirectory(prefix="msa-load-") as directory:
        prefix = Path(directory) / "shop"
        command = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--host",
            host,
            "-u",
            str(users),
            "-r",
            str(spawn_rate),
            "-t",
            duration,
            "--csv",
            str(prefix),
            "--only-summary",
            "--loglevel",
            "ERROR",
        ]
        began = time.monotonic()
        errors = Path(directory) / "locust.err"
        with errors.open("wb") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
            while process.poll() is None:
                done = min(1.0, (time.monotonic() - began) / seconds)
                bar = "#" * int(done * 40)
                print(
                    f"\r[{bar:<40}] {done:4.0%}  {users} users against {host}", end="", flush=True
                )
                time.sleep(0.5)
        print()
        stats = Path(f"{prefix}_stats.csv")
        if process.returncode not in (0, 1) or not stats.exists():
            error = errors.read_text(errors="replace")
            print(f"locust failed ({process.returncode}): {error[-2000:]}", file=sys.stderr)
            return 2
        print(summarize(stats, min(seconds, time.monotonic() - began)))
        return 0 if process.returncode == 0 else 1
