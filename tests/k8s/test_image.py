"""Rules for the image (Dockerfile, .dockerignore) and compose.yaml that no linter here checks:
pinned bases, a fixed non-root user, a health check, a minimal build context, and compose
running the same commands as the Kubernetes Deployments."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from example_shop.shop import START_ORDER

REPO = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_image_is_multi_stage_on_one_pinned_slim_base() -> None:
    instructions = _instructions()
    (default,) = [args for name, args in instructions if name == "ARG" and args.startswith("BASE=")]
    assert re.fullmatch(r"BASE=python:3\.11\.\d+-slim(-\w+)?", default), default
    assert instructions[: instructions.index(("ARG", default)) + 1] == [("ARG", default)], (
        "ARG BASE comes before the first FROM, so every stage can use it"
    )
    bases = [args.split()[0] for name, args in instructions if name == "FROM"]
    assert len(bases) >= 2
    assert set(bases) == {"${BASE}"}, bases


def test_the_image_runs_as_a_fixed_non_root_user_with_a_health_check() -> None:
    instructions = _instructions()
    users = [args for name, args in instructions if name == "USER"]
    assert users
    assert users[-1].split(":")[0] == "10001"
    (healthcheck,) = [args for name, args in instructions if name == "HEALTHCHECK"]
    assert "/alive" in healthcheck
    (entrypoint,) = [args for name, args in instructions if name == "ENTRYPOINT"]
    assert entrypoint == '["msa"]'


def test_the_build_context_is_an_allow_list() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "exclude everything, then allow what the image needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "framework", "example_shop"}


def test_compose_pins_every_image_and_runs_what_kubernetes_runs() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    for name, service in services.items():
        repository, _, tag = service["image"].rpartition(":")
        assert repository, f"{name}: {service['image']} has no tag"
        assert tag != "latest", f"{name}: {service['image']}"
    for name in START_ORDER:
        deployment = yaml.safe_load_all(
            (REPO / "k8s" / "base" / "services" / f"{name}.yaml").read_text()
        )
        (spec,) = [d for d in deployment if d["kind"] == "Deployment"]
        (container,) = spec["spec"]["template"]["spec"]["containers"]
        assert services[name]["command"] == container["args"], name
        assert services[name]["user"] == "10001:10001"
        assert services[name]["read_only"] is True
