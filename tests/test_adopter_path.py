"""The README's "Adopting the framework" path, word for word, from the wheel in a new venv.

A user has only the wheel: no checkout, no `PYTHONPATH`, no project configuration. The two files
of `examples/shipping/` are the README's two code blocks (checked here), copied into an empty
folder and tested there the way the README says: `pytest` (in memory), `pytest
--msa-transport=kafka` (on the real broker), and `msa run shipping:Shipping` until SIGTERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "shipping"
FILES = ("shipping.py", "test_shipping.py")


def _uv() -> str:
    cache = os.environ.get("MSA_CACHE_DIR") or str(Path.home() / ".cache" / "msa-framework")
    for candidate in (Path(cache) / "tools" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("no uv (scripts/test installs it into $MSA_CACHE_DIR/tools)", pytrace=False)


@dataclass(frozen=True)
class Adopter:
    """A new venv with the wheel installed, and a folder with the example's two files."""

    venv: Path
    work: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{self.venv / 'bin'}:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "MSA_LOG_FORMAT": "text",
            **extra,
        }

    def run(self, *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.work, env=self.env(**extra), capture_output=True, text=True, timeout=300
        )


@pytest.fixture(scope="module")
def adopter(tmp_path_factory: pytest.TempPathFactory) -> Adopter:
    root = tmp_path_factory.mktemp("adopter")
    uv = _uv()
    built = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(root / "dist"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (root / "dist").glob("msa_framework-*.whl")
    venv = root / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    installed = subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
         f"{wheel}[kafka]", "pytest", "pytest-asyncio"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    work = root / "work"
    work.mkdir()
    for name in FILES:
        shutil.copy(EXAMPLE / name, work / name)
    return Adopter(venv=venv, work=work)


def test_the_readme_shows_the_example_files_word_for_word() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    for name in FILES:
        text = (EXAMPLE / name).read_text()
        assert text.startswith(f"# {name}\n")
        assert text in blocks, f"README.md has no code block equal to examples/shipping/{name}"


def test_the_example_passes_in_memory_from_the_wheel(adopter: Adopter) -> None:
    result = adopter.run("pytest", "-q", "-p", "no:cacheprovider")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "warning" not in result.stdout.lower(), result.stdout


@pytest.mark.kafka
def test_the_example_passes_on_kafka_from_the_wheel(adopter: Adopter, kafka_bootstrap: str) -> None:
    result = adopter.run(
        "pytest", "-q", "-p", "no:cacheprovider", "--msa-transport=kafka",
        KAFKA_BOOTSTRAP=kafka_bootstrap,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_msa_run_serves_the_example_until_sigterm(adopter: Adopter) -> None:
    process = subprocess.Popen(
        ["msa", "run", "shipping:Shipping"],
        cwd=adopter.work,
        env=adopter.env(MSA_HTTP_PORT="0", MSA_TRANSPORT="memory"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "started on" in line:
                break
        assert any("service shipping started on the memory transport" in x for x in lines), lines
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
