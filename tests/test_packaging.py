"""The distribution installs, imports and exposes its command line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import framework

REPO = Path(__file__).resolve().parent.parent


def test_version_matches_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert framework.__version__ == project["version"]


def test_msa_help_from_the_installed_entry_point() -> None:
    msa = Path(sys.executable).with_name("msa")
    result = subprocess.run([str(msa), "--help"], capture_output=True, text=True, check=True)
    assert "usage: msa" in result.stdout
    version = subprocess.run([str(msa), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"msa-framework {framework.__version__}"


def test_wheel_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    """`pip install .` in a clean venv gives `import framework` and `msa --help`."""
    venv = tmp_path / "venv"
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    if Path(uv).exists():
        install = [uv, "pip", "install", "--quiet", "--python", str(python), str(REPO)]
    else:
        install = [str(python), "-m", "pip", "install", "--quiet", str(REPO)]
    subprocess.run(install, check=True, cwd=tmp_path)
    imported = subprocess.run(
        [str(python), "-c", "import framework, example_shop; print(framework.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert imported.stdout.strip() == framework.__version__
    helped = subprocess.run(
        [str(venv / "bin" / "msa"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert "usage: msa" in helped.stdout
