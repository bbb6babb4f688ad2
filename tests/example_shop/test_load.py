"""`msa shop load`: Locust, headless, against the running shop; the summary table it prints."""

from __future__ import annotations

import asyncio
import re

import pytest

from example_shop.load import parse_duration, run_load
from example_shop.shop import Shop


@pytest.mark.asyncio(loop_scope="package")  # the loop of the package's shop
async def test_the_load_generator_drives_the_shop_and_prints_a_summary(
    embedded_shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await asyncio.to_thread(
        run_load,
        host=embedded_shop.url.rstrip("/"),
        users=6,
        spawn_rate=6,
        duration="6s",
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "all requests" in out
    match = re.search(r"orders placed: (\d+)", out)
    assert match is not None, out
    assert int(match.group(1)) >= 1
    summary = next(line for line in out.splitlines() if line.startswith("all requests"))
    assert int(summary.split()[2]) > 0  # requests (how many depends on the machine's speed)
    assert summary.split()[-1] == "0"  # errors


def test_durations_parse_like_locust() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("2m") == 120
    assert parse_duration("1h30m") == 5400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
