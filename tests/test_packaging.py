"""The two distributions this repository builds: `msa-framework` (pyproject.toml), the framework
alone, and `msa-example-shop` (example_shop/pyproject.toml), which requires it and adds `msa shop`
through an entry point. Each wheel holds its own package; the framework never imports the shop;
both install into a fresh venv and expose their commands."""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest

import framework

REPO = Path(__file__).resolve().parent.parent
SHOP = REPO / "example_shop"
MSA = Path(sys.executable).with_name("msa")


def _uv() -> str:
    cache = os.environ.get("MSA_CACHE_DIR") or str(Path.home() / ".cache" / "msa-framework")
    for candidate in (Path(cache) / "tools" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("no uv (scripts/test installs it into $MSA_CACHE_DIR/tools)", pytrace=False)


@dataclass(frozen=True)
class Wheel:
    path: Path

    @property
    def names(self) -> list[str]:
        with zipfile.ZipFile(self.path) as wheel:
            return wheel.namelist()

    @property
    def packages(self) -> set[str]:
        return {name.split("/")[0] for name in self.names if ".dist-info/" not in name}

    def read(self, name: str) -> str:
        [path] = [n for n in self.names if n.endswith(f".dist-info/{name}")]
        with zipfile.ZipFile(self.path) as wheel:
            return wheel.read(path).decode()

    @property
    def metadata(self) -> Message:
        return Parser().parsestr(self.read("METADATA"))

    @property
    def entry_points(self) -> configparser.ConfigParser:
        parser = configparser.ConfigParser(delimiters=("=",))
        parser.read_string(self.read("entry_points.txt"))
        return parser


@dataclass(frozen=True)
class Wheels:
    framework: Wheel
    shop: Wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    """Both wheels, built the way a release builds them (`uv build --wheel`)."""
    dist = tmp_path_factory.mktemp("dist")
    for project in (REPO, SHOP):
        built = subprocess.run(
            [_uv(), "build", "--wheel", "--out-dir", str(dist), str(project)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert built.returncode == 0, built.stderr
    [framework_wheel] = dist.glob("msa_framework-*.whl")
    [shop_wheel] = dist.glob("msa_example_shop-*.whl")
    return Wheels(framework=Wheel(framework_wheel), shop=Wheel(shop_wheel))


def test_version_matches_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert framework.__version__ == project["version"]


def test_the_shop_is_released_with_the_framework_at_its_version() -> None:
    project = tomllib.loads((SHOP / "pyproject.toml").read_text())["project"]
    assert project["version"] == framework.__version__
    assert f"msa-framework[all]=={framework.__version__}" in project["dependencies"]


def test_the_framework_wheel_holds_the_framework_alone(wheels: Wheels) -> None:
    assert wheels.framework.packages == {"framework"}
    assert "framework/py.typed" in wheels.framework.names
    metadata = wheels.framework.metadata
    assert metadata["Name"] == "msa-framework"
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {"kafka", "postgres", "mongo", "gateway", "streams", "all", "dev"} <= extras
    assert not extras & {"shop", "bench"}, extras
    requirements = " ".join(metadata.get_all("Requires-Dist") or [])
    for other in ("example-shop", "locust", "mongomock", "faststream", "fastapi"):
        assert other not in requirements
    points = wheels.framework.entry_points
    assert dict(points["console_scripts"]) == {"msa": "framework.cli:main"}
    assert not points.has_section("msa.commands")


def test_the_shop_wheel_holds_the_shop_and_requires_the_framework(wheels: Wheels) -> None:
    names = wheels.shop.names
    assert wheels.shop.packages == {"example_shop"}
    for data in ("gateway/web.yaml", "storefront/static/index.html", "load/locustfile.py"):
        assert f"example_shop/{data}" in names
    assert "example_shop/pyproject.toml" not in names
    metadata = wheels.shop.metadata
    assert metadata["Name"] == "msa-example-shop"
    requirements = metadata.get_all("Requires-Dist") or []
    assert f"msa-framework[all]=={framework.__version__}" in requirements
    assert dict(wheels.shop.entry_points["msa.commands"]) == {"shop": "example_shop.cli:command"}


def test_the_framework_never_imports_the_shop() -> None:
    """Neither in its source nor when every one of its modules is imported (building the parser
    of its own commands included); only the shop's entry point brings the shop in."""
    for path in (REPO / "framework").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] == "example_shop"], path
    check = (
        "import importlib, pkgutil, sys\n"
        "import framework, framework.cli\n"
        "for module in pkgutil.walk_packages(framework.__path__, 'framework.'):\n"
        "    importlib.import_module(module.name)\n"
        "framework.cli.build_parser({})\n"
        "shop = sorted(n for n in sys.modules if n.split('.')[0] == 'example_shop')\n"
        "assert not shop, shop\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_msa_and_msa_shop_help_from_the_installed_entry_points() -> None:
    result = subprocess.run([str(MSA), "--help"], capture_output=True, text=True, check=True)
    assert "usage: msa" in result.stdout
    version = subprocess.run([str(MSA), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"msa-framework {framework.__version__}"
    shop = subprocess.run([str(MSA), "shop", "--help"], capture_output=True, text=True, check=True)
    assert shop.stdout.startswith("usage: msa shop"), shop.stdout
    assert "--real" in shop.stdout


def test_the_wheels_install_into_a_fresh_venv(wheels: Wheels, tmp_path: Path) -> None:
    """The framework's wheel alone gives `framework` and `msa`, with no shop (`msa shop` says how
    to get it); adding the shop's wheel gives `msa shop` and the shop's graph."""
    uv = _uv()
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    python, msa = venv / "bin" / "python", venv / "bin" / "msa"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}

    def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, cwd=tmp_path, env=env
        )

    def install(*wheels: Path) -> None:
        argv = [uv, "pip", "install", "--quiet", "--python", str(python), *map(str, wheels)]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr

    install(wheels.framework.path)
    imported = run(python, "-c", "import framework; print(framework.__version__)")
    assert imported.stdout.strip() == framework.__version__, imported.stderr
    assert "ModuleNotFoundError" in run(python, "-c", "import example_shop").stderr
    assert "usage: msa" in run(msa, "--help").stdout
    missing = run(msa, "shop")
    assert missing.returncode == 2
    assert "pip install msa-example-shop" in missing.stderr, missing.stderr

    install(wheels.framework.path, wheels.shop.path)
    helped = run(msa, "shop", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: msa shop")
    drawn = run(msa, "graph")
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.startswith("flowchart LR")
    assert "s_orders --> t_shop_payments_commands" in drawn.stdout
