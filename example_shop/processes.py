"""The shop as separate processes: `msa shop --processes` (or `scripts/processes up|down|status`).

Every service runs as its own `msa run example_shop.<name>:<Class>` process and the web gateway
as `msa gateway --config example_shop/gateway/web.yaml`, the way they are deployed (a Pod each),
on the Kafka, PostgreSQL and MongoDB the environment names (KAFKA_BOOTSTRAP, POSTGRES_URL,
MONGO_URL; `eval "$(scripts/devservices up)"` starts them):

    shop = ShopProcesses(ShopLayout.from_env())
    shop.start()            # identity first ... storefront, then the gateway, each ready-checked
    print(shop.url)         # http://localhost:8000/
    shop.kill("payments")   # SIGKILL one service (a chaos test's crash) ...
    shop.restart("payments")  # ... and start it again, ready-checked
    shop.revive_exited()    # start again whatever exited (a crash), as Kubernetes would
    shop.stop()             # SIGTERM in reverse order, SIGKILL after the grace period

Lifecycle promises:

- `start()` starts the processes one by one in `START_ORDER` (identity first: the gateway fetches
  its JWKS at start), waiting for each one's `GET /ready` (200) before the next, then the gateway,
  waited for through its admin `/ready`. A process that exits or stays unready past
  `ready_timeout` stops the start: everything started so far is stopped and `ProcessFailed` names
  the process and shows the end of its log.
- Each process writes stdout and stderr to `<run_dir>/<name>.log`; `<run_dir>/processes.json`
  lists pid, port and log of each (what `status()` and `scripts/processes status` read).
- `stop()` sends SIGTERM to the gateway, then to the services in reverse start order, waiting
  for each to exit for `grace` seconds before SIGKILL. It is idempotent.
- `revive_exited()` starts again, ready-checked, each process that exited on its own (a crash,
  e.g. the admin page's `crash_next` fault switch), like a Pod's `restartPolicy: Always`;
  `msa shop --processes` calls it twice a second. A process that exits `CRASH_LOOP` times within
  `CRASH_LOOP_WINDOW` seconds is not started again: `ProcessFailed` (a crash loop, as
  Kubernetes' CrashLoopBackOff shows it).
- The processes run in their own sessions: a Ctrl-C in the terminal reaches `msa shop
  --processes` only, which then stops them in order.

`ready` means the process serves; it does not mean the orders service has heard of every
product's price and stock yet (the catalog and inventory announce them on Kafka): a cart
request for a product may answer 404 for the first seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from example_shop.common import PORTS
from example_shop.registry import GATEWAY_CONFIGS
from example_shop.shop import MONGO_SERVICES, POSTGRES_SERVICES, START_ORDER, service_classes

__all__ = ["GATEWAY", "REQUIRED_VARIABLES", "ProcessFailed", "ShopLayout", "ShopProcesses"]

GATEWAY = "gateway"
"""The name of the web gateway's process, after the services'."""
REQUIRED_VARIABLES = ("KAFKA_BOOTSTRAP", "POSTGRES_URL", "MONGO_URL")
STATE_FILE = "processes.json"
CRASH_LOOP = 5
"""Exits within `CRASH_LOOP_WINDOW` seconds after which `revive_exited` gives a process up."""
CRASH_LOOP_WINDOW = 60.0


class ProcessFailed(RuntimeError):
    """A process exited or did not become ready; the message names it and ends with its log."""


def _default_run_dir(env: Mapping[str, str]) -> Path:
    base = env.get("MSA_RUN_DIR")
    if base:
        return Path(base) / "shop"
    return Path(tempfile.gettempdir()) / f"msa-shop-{os.getuid()}"


def _with_database(url: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@dataclass(frozen=True, kw_only=True)
class ShopLayout:
    """Where the processes listen, which databases they use and where they log.

    `database_prefix` names every service's database, `<prefix>_<service>` (PostgreSQL through
    `<SERVICE>_DATABASE_URL`, MongoDB through `<SERVICE>_MONGO_DB`): `shop` is what a service
    uses by default; a test gives a fresh one so it never meets an earlier run's data.
    """

    env: Mapping[str, str] = field(repr=False)
    run_dir: Path
    gateway_port: int = 8000
    gateway_admin_port: int = 8001
    ports: Mapping[str, int] = field(default_factory=lambda: dict(PORTS))
    database_prefix: str = "shop"
    ready_timeout: float = 60.0
    grace: float = 10.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, gateway_port: int = 8000
    ) -> ShopLayout:
        """The layout `msa shop --processes` runs: README's ports, `shop_<service>` databases,
        logs under `$MSA_RUN_DIR/shop/` (or `<tmp>/msa-shop-<uid>/`)."""
        env = dict(os.environ if env is None else env)
        return cls(env=env, run_dir=_default_run_dir(env), gateway_port=gateway_port)

    @property
    def url(self) -> str:
        return f"http://localhost:{self.gateway_port}/"

    def missing_variables(self) -> list[str]:
        return [name for name in REQUIRED_VARIABLES if not self.env.get(name)]

    def shared_env(self) -> dict[str, str]:
        """What every process gets: the environment, Kafka, and where each service is."""
        env = {**self.env, "MSA_TRANSPORT": "kafka"}
        env.setdefault("MSA_HTTP_HOST", "127.0.0.1")
        for name, port in self.ports.items():
            env[f"{name.upper()}_URL"] = f"http://127.0.0.1:{port}"
        for name in POSTGRES_SERVICES:
            database = f"{self.database_prefix}_{name}"
            env[f"{name.upper()}_DATABASE_URL"] = _with_database(self.env["POSTGRES_URL"], database)
        for name in MONGO_SERVICES:
            env[f"{name.upper()}_MONGO_DB"] = f"{self.database_prefix}_{name}"
        return env

    def service_env(self, name: str) -> dict[str, str]:
        env = {**self.shared_env(), "MSA_HTTP_PORT": str(self.ports[name])}
        # The admin page's fault switches (framework.faults); one process may crash alone.
        env["MSA_SHOP_PROCESSES"] = "1"
        env.setdefault("MSA_FAULTS", "1")
        return env

    def gateway_env(self, files_signing_key: str) -> dict[str, str]:
        env = self.shared_env()
        env.setdefault("GATEWAY_HOST", "127.0.0.1")
        env.setdefault("STOREFRONT_ORIGIN", f"http://localhost:{self.gateway_port}")
        env["GATEWAY_PORT"] = str(self.gateway_port)
        env["GATEWAY_ADMIN_PORT"] = str(self.gateway_admin_port)
        # A key of this run's own: the web profile refuses its public dev-only fallback.
        env["FILES_SIGNING_KEY"] = files_signing_key
        return env

    def ready_url(self, name: str) -> str:
        if name == GATEWAY:
            return f"http://127.0.0.1:{self.gateway_admin_port}/ready"
        return f"http://127.0.0.1:{self.ports[name]}/ready"

    def command(self, name: str) -> list[str]:
        cli = [sys.executable, "-m", "framework.cli"]
        if name == GATEWAY:
            return [*cli, "gateway", "--config", str(GATEWAY_CONFIGS / "web.yaml")]
        return [*cli, "run", f"example_shop.{name}:{service_classes()[name].__name__}"]


class ShopProcesses:
    """Every shop service as its own OS process, plus the web gateway; see the module docstring.

    `processes` maps each started name (`START_ORDER`, then `GATEWAY`) to its `Popen`.
    """

    def __init__(self, layout: ShopLayout) -> None:
        self.layout = layout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._files_signing_key = secrets.token_urlsafe(32)
        self._started = False
        self._exits: dict[str, list[float]] = {}  # name -> when it was found exited (monotonic)

    @property
    def names(self) -> tuple[str, ...]:
        return (*START_ORDER, GATEWAY)

    @property
    def url(self) -> str:
        return self.layout.url

    @property
    def run_dir(self) -> Path:
        return self.layout.run_dir

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start every process in order, each ready before the next; on failure, stop them all
        and raise `ProcessFailed` (or SystemExit naming the missing variables)."""
        missing = self.layout.missing_variables()
        if missing:
            raise SystemExit(
                f"msa shop --processes: {', '.join(missing)} not set; "
                'start the servers with: eval "$(scripts/devservices up)"'
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.names:
                self._spawn(name, append=False)
                self.wait_ready(name)
        except BaseException:
            self.stop()
            raise
        self._started = True
        self._write_state()

    def stop(self) -> None:
        """SIGTERM to the gateway, then to the services in reverse order, each waited for
        `grace` seconds before SIGKILL."""
        self._started = False
        for name in reversed(self.names):
            if name in self.processes:
                self._terminate(name)
        self._write_state()

    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash: no graceful stop) and reap it."""
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        self._close_log(name)
        self._write_state()

    def revive_exited(self) -> list[str]:
        """Start again, each ready before the next, the processes that exited since they were
        started; returns their names. `ProcessFailed` for a process in a crash loop."""
        revived = []
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                continue
            now = time.monotonic()
            exits = [t for t in self._exits.get(name, []) if now - t < CRASH_LOOP_WINDOW]
            self._exits[name] = [*exits, now]
            if len(self._exits[name]) >= CRASH_LOOP:
                raise ProcessFailed(
                    f"{name} exited {CRASH_LOOP} times within {CRASH_LOOP_WINDOW:.0f} s (last "
                    f"code {process.returncode}); see {self.log_path(name)}:\n"
                    + self._log_tail(name)
                )
            self._close_log(name)
            self._spawn(name, append=True)
            self.wait_ready(name)
            revived.append(name)
        if revived:
            self._write_state()
        return revived

    def restart(self, name: str) -> None:
        """Stop `name` (SIGTERM, then SIGKILL after the grace period) if it runs, start it again
        and wait until it is ready."""
        if name in self.processes:
            self._terminate(name)
        self._spawn(name, append=True)
        self.wait_ready(name)

    def status(self) -> dict[str, dict[str, object]]:
        """Name -> pid, return code (None while running), port, ready and log of each started
        process."""
        report: dict[str, dict[str, object]] = {}
        for name, process in self.processes.items():
            returncode = process.poll()
            report[name] = {
                "pid": process.pid,
                "returncode": returncode,
                "port": self._port(name),
                "ready": returncode is None and _is_ready(self.layout.ready_url(name)),
                "log": str(self.log_path(name)),
            }
        return report

    def wait_ready(self, name: str, timeout: float | None = None) -> None:
        """Return once `name` answers 200 on its `/ready`; `ProcessFailed` if it exits first
        or `timeout` (the layout's `ready_timeout`) passes."""
        process = self.processes[name]
        deadline = time.monotonic() + (self.layout.ready_timeout if timeout is None else timeout)
        url = self.layout.ready_url(name)
        while not _is_ready(url):
            if process.poll() is not None:
                raise ProcessFailed(
                    f"{name} exited with code {process.returncode} before it was ready"
                    f"{self._log_tail(name)}"
                )
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{name} was not ready at {url} in time{self._log_tail(name)}")
            time.sleep(0.1)

    # -- one process -------------------------------------------------------------------------

    def _spawn(self, name: str, *, append: bool) -> None:
        env = (
            self.layout.gateway_env(self._files_signing_key)
            if name == GATEWAY
            else self.layout.service_env(name)
        )
        log = self.log_path(name).open("ab" if append else "wb")
        self._logs[name] = log
        self.processes[name] = subprocess.Popen(
            self.layout.command(name),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop them in order
        )
        self._write_state()

    def _terminate(self, name: str) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.layout.grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_log(name)

    def _close_log(self, name: str) -> None:
        log = self._logs.pop(name, None)
        if log is not None:
            log.close()

    def _port(self, name: str) -> int:
        return self.layout.gateway_port if name == GATEWAY else self.layout.ports[name]

    def _log_tail(self, name: str, lines: int = 20) -> str:
        try:
            tail = self.log_path(name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; the end of {self.log_path(name)}:\n    " + "\n    ".join(tail)

    def _write_state(self) -> None:
        state = {
            "url": self.url,
            "started": self._started,
            "processes": {
                name: {
                    "pid": process.pid,
                    "port": self._port(name),
                    "ready_url": self.layout.ready_url(name),
                    "log": str(self.log_path(name)),
                }
                for name, process in self.processes.items()
            },
        }
        with contextlib.suppress(OSError):
            (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def serve(port: int) -> int:
    """`msa shop --processes`: start the processes, print the URL and the logs' directory, run
    until Ctrl-C or SIGTERM, then stop them in order."""
    shop = ShopProcesses(ShopLayout.from_env(gateway_port=port))

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    print(f"msa shop --processes: logs in {shop.run_dir}/", flush=True)
    try:
        shop.start()
        print(
            f"\nmsa shop is running as {len(shop.processes)} processes (Kafka, PostgreSQL and "
            f"MongoDB from the environment).\n\n    Storefront:  {shop.url}\n    Logs:        "
            f"{shop.run_dir}/<name>.log\n\n    Sign in as demo@shop.test / demo-password-123. "
            "Ctrl-C stops them.\n",
            flush=True,
        )
        while True:
            exited = {n: p.returncode for n, p in shop.processes.items() if p.poll() is not None}
            for name in shop.revive_exited():
                print(
                    f"msa shop --processes: {name} exited with code {exited.get(name)} (see "
                    f"{shop.log_path(name)}); started it again",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except ProcessFailed as exc:
        print(f"msa shop --processes: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C: still stop them all
            signal.signal(signum, signal.SIG_IGN)
        shop.stop()


# -- scripts/processes up|down|status: the foreground runner, in the background ------------------

SUPERVISOR_PID = "shop.pid"
SUPERVISOR_LOG = "shop.log"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _supervisor(run_dir: Path) -> int | None:
    """The pid of the running `msa shop --processes` that `up` started, else None."""
    try:
        pid = int((run_dir / SUPERVISOR_PID).read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _state(run_dir: Path) -> dict[str, object]:
    try:
        state: dict[str, object] = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state


def up(layout: ShopLayout, timeout: float = 300.0) -> int:
    """Start `msa shop --processes` in the background (its own session, logging to
    `<run_dir>/shop.log`) and return once every process is ready."""
    run_dir = layout.run_dir
    if _supervisor(run_dir) is not None:
        print(f"the shop is already running: {_state(run_dir).get('url')} (logs in {run_dir}/)")
        return 0
    missing = layout.missing_variables()
    if missing:
        print(
            f"{', '.join(missing)} not set; start the servers with: "
            'eval "$(scripts/devservices up)"',
            file=sys.stderr,
        )
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    command = [sys.executable, "-m", "framework.cli", "shop", "--processes"]
    with (run_dir / SUPERVISOR_LOG).open("wb") as log:
        supervisor = subprocess.Popen(
            [*command, "--port", str(layout.gateway_port)],
            env=dict(layout.env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (run_dir / SUPERVISOR_PID).write_text(str(supervisor.pid))
    deadline = time.monotonic() + timeout
    while not _state(run_dir).get("started"):
        if supervisor.poll() is not None or time.monotonic() > deadline:
            if supervisor.poll() is None:
                supervisor.terminate()
                supervisor.wait()
            print(
                f"the shop did not start; see {run_dir / SUPERVISOR_LOG}:\n"
                + (run_dir / SUPERVISOR_LOG).read_text(errors="replace")[-3000:],
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)
    print(f"the shop is running: {layout.url} (logs in {run_dir}/; stop: scripts/processes down)")
    return 0


def down(layout: ShopLayout, timeout: float = 120.0) -> int:
    """SIGTERM to the background `msa shop --processes` (which stops its processes in order);
    SIGKILL to it and to every process it started if it has not exited within `timeout`."""
    run_dir = layout.run_dir
    pid = _supervisor(run_dir)
    if pid is None:
        print("the shop is not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        processes = _state(run_dir).get("processes") or {}
        assert isinstance(processes, dict)
        for pid_ in [pid, *(entry["pid"] for entry in processes.values())]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid_, signal.SIGKILL)
        print(f"the shop did not stop within {timeout:.0f} s: killed it", file=sys.stderr)
    (run_dir / SUPERVISOR_PID).unlink(missing_ok=True)
    print("the shop is stopped")
    return 0


def status(layout: ShopLayout) -> int:
    """One line per process (name, pid, port, running, ready, log); 0 when all are ready."""
    run_dir = layout.run_dir
    state = _state(run_dir)
    processes = state.get("processes") or {}
    assert isinstance(processes, dict)
    if _supervisor(run_dir) is None or not processes:
        print(f"the shop is not running (run dir {run_dir}/)")
        return 3
    print(f"{state.get('url')}  (supervisor pid {_supervisor(run_dir)}, logs in {run_dir}/)")
    all_ready = True
    for name, entry in processes.items():
        running = _alive(int(entry["pid"]))
        ready = running and _is_ready(str(entry["ready_url"]))
        all_ready = all_ready and ready
        print(
            f"  {name:<11} pid {entry['pid']:<8} port {entry['port']:<6} "
            f"{'running' if running else 'EXITED ':<7}  {'ready' if ready else 'NOT READY':<9}  "
            f"{entry['log']}"
        )
    return 0 if all_ready else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m example_shop.processes up [--port N] | down | status` (scripts/processes)."""
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/processes", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--port", type=int, default=8000, help="up: the web gateway's port")
    args = parser.parse_args(argv)
    layout = ShopLayout.from_env(gateway_port=args.port)
    actions = {"up": up, "down": down, "status": status}
    return actions[args.action](layout)


if __name__ == "__main__":
    sys.exit(main())
