"""`msa gateway --workers N`: N gateway processes serving one port, under one supervisor.

    msa gateway --config gateway.yaml --workers 4

A gateway is one event loop, so one core. With `--workers N` the `msa gateway` process becomes a
supervisor that serves nothing itself:

1. It reads the config (a bad one is refused as without workers) and reserves the listen and
   admin addresses: it binds a socket to each without listening (on Linux a bound socket that
   does not listen receives no connections). That resolves `port: 0` and keeps both ports the
   gateway's for the supervisor's lifetime, across worker restarts. The reservation sets
   SO_REUSEADDR but not SO_REUSEPORT, so a second gateway started on a port the workers already
   serve is refused as a second single process is, instead of joining their group.
2. It starts workers 0..N-1, each `python -m framework.gateway.workers ...`: a `Gateway` with
   `reuse_port=True` listening on that port, so the kernel spreads new connections over them
   (SO_REUSEPORT, by a hash of each connection's addresses). Worker 0 serves the admin API on
   the admin port and answers for all (`framework.gateway.peers`): `/admin/metering` sums the
   workers' usage, `/metrics` has every worker's series labelled `worker="i"`, and
   `POST /admin/reload` reloads every worker. It reaches the others over unix sockets in a
   private directory (mode 0700) the supervisor creates and removes. Each worker also watches
   the config file, so an edited file reloads them all.
3. It prints `gateway listening on port P (admin A)` once, when every worker listens (a worker
   says so on a pipe of its own). A worker that exits before that fails the start (exit 2).
4. It restarts a worker that exits on its own (a warning with its exit status), after a backoff:
   0.5 s, doubling while the worker keeps dying within a minute of its start, up to 30 s.
5. On SIGTERM or SIGINT it sends SIGTERM to every worker, each of which finishes its requests as
   a single gateway does, and exits 0 once all have exited (1 if one did not exit cleanly).

If the supervisor itself dies (SIGKILL, the OOM killer), its workers stop by themselves: each
holds the read end of a pipe whose write end only the supervisor has, and stops its gateway
gracefully when the pipe reports end of file.

Workers are fresh interpreters (`sys.executable -m framework.gateway.workers`), not
`multiprocessing` children: nothing of the supervisor's state (its event loop, sockets, threads)
is inherited through a fork or pickled, each sets up logging, uvloop and the access log exactly
as `msa gateway` does, `ps` shows which worker a process is, and the supervisor sees each one's
exit status as it would any process's. Every worker logs to the supervisor's stderr and writes
the access log as a single gateway would (`MSA_ACCESS_LOG_FILE`: every worker appends to the
one file, opened with O_APPEND, so no worker's lines overwrite another's).

What is per worker, and what that means:

- Rate limits and quotas: each worker enforces 1/N of every tier's rate, burst and daily quota
  (`Gateway(share=N)`), so the workers together allow what the tier says for a client whose
  connections spread over them. A client that sends everything over one keep-alive connection
  talks to one worker only and meets 1/N of its limit (and of its daily quota).
- `limits.max_connections` and `max_concurrency`, the response cache, circuit breakers and
  adaptive concurrency limits: each worker has its own, as N replicas behind a balancer would.
- A worker that dies abruptly resets the connections it had accepted and those the kernel was
  still handing it: its accept queue, and for a moment new ones (on Linux 5.14+,
  `sysctl net.ipv4.tcp_migrate_req=1` hands queued ones to another worker). Its port keeps
  answering through the others meanwhile. A graceful stop (SIGTERM) finishes every accepted
  request.

SO_REUSEPORT balancing is Linux's behaviour; other systems may send every connection to one
worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from framework.errors import ConfigurationError, MsaError
from framework.gateway.app import Gateway, settle_garbage_collector
from framework.gateway.config import GatewayConfig, load_config
from framework.gateway.metering import AccessLog
from framework.observability.logging import configure_logging

__all__ = ["MAX_WORKERS", "WorkerSpec", "main", "serve_worker", "supervise", "worker_count"]

log = logging.getLogger("framework.gateway.workers")

MAX_WORKERS = 64
"""The most workers `--workers` accepts."""
FIRST_BACKOFF = 0.5
"""Seconds before restarting a worker that died, doubled for each further quick death."""
MAX_BACKOFF = 30.0
"""The longest wait before a restart."""
STABLE = 60.0
"""A worker that served this many seconds before dying is restarted after `FIRST_BACKOFF`."""
READY = b"ready\n"
"""What a worker writes on its ready pipe once it listens."""


def worker_count(text: str) -> int:
    """`--workers`: an integer from 1 to `MAX_WORKERS` (an `argparse` type)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_WORKERS}, not {count}")
    return count


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What one worker is told by its supervisor (its command line, `arguments()`)."""

    config: Path
    index: int
    workers: int
    port: int
    """The listen port the supervisor reserved (the config's may be 0)."""
    admin_port: int
    """Worker 0's admin port, likewise."""
    sockets: Path
    """The private directory of the workers' unix sockets."""
    lifeline: int
    """The read end of the supervisor's pipe: end of file means the supervisor is gone."""
    ready: int
    """The write end of this worker's ready pipe."""

    def socket_of(self, index: int) -> str:
        return str(self.sockets / f"worker-{index}.sock")

    def arguments(self) -> list[str]:
        return [
            "--config",
            str(self.config),
            "--index",
            str(self.index),
            "--workers",
            str(self.workers),
            "--port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--sockets",
            str(self.sockets),
            "--lifeline",
            str(self.lifeline),
            "--ready",
            str(self.ready),
        ]

    @classmethod
    def parse(cls, argv: Sequence[str]) -> WorkerSpec:
        parser = argparse.ArgumentParser(
            prog="python -m framework.gateway.workers",
            description="One worker of `msa gateway --workers N` (started by its supervisor).",
        )
        parser.add_argument("--config", type=Path, required=True)
        for name in ("index", "workers", "port", "admin-port", "lifeline", "ready"):
            parser.add_argument(f"--{name}", type=int, required=True)
        parser.add_argument("--sockets", type=Path, required=True)
        args = parser.parse_args(argv)
        return cls(
            config=args.config,
            index=args.index,
            workers=args.workers,
            port=args.port,
            admin_port=args.admin_port,
            sockets=args.sockets,
            lifeline=args.lifeline,
            ready=args.ready,
        )

    def gateway(self) -> Gateway:
        """This worker's gateway: the file's config on the reserved ports; worker 0 with the
        admin API and the others as its peers, the others with their peer app only."""
        config = _on_ports(load_config(self.config), self.port, self.admin_port)
        others = range(1, self.workers)
        if self.index == 0:
            return Gateway(
                config,
                config_path=self.config,
                reuse_port=True,
                share=self.workers,
                peers=[self.socket_of(i) for i in others],
            )
        return Gateway(
            config,
            config_path=self.config,
            reuse_port=True,
            share=self.workers,
            admin_unix=self.socket_of(self.index),
        )


def _on_ports(config: GatewayConfig, port: int, admin_port: int) -> GatewayConfig:
    """`config` listening on `port`, its admin API on `admin_port`.

    Only the start reads these: a reload re-reads the file (with the file's ports) but keeps
    the listening sockets."""
    settings = config.gateway
    listen = settings.listen.model_copy(update={"port": port})
    admin = settings.admin.model_copy(update={"port": admin_port})
    gateway = settings.model_copy(update={"listen": listen, "admin": admin})
    return config.model_copy(update={"gateway": gateway})


# -- a worker ------------------------------------------------------------------------------------


async def serve_worker(spec: WorkerSpec) -> int:
    """Run one worker until SIGTERM/SIGINT or its supervisor's end; stop it gracefully."""
    configure_logging("gateway")
    gateway = spec.gateway()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    orphaned = False

    def supervisor_gone() -> None:
        nonlocal orphaned
        if not os.read(spec.lifeline, 1):  # only end of file ever comes: no one writes
            log.warning("gateway worker %d: the supervisor is gone; stopping", spec.index)
            loop.remove_reader(spec.lifeline)
            orphaned = True
            stop.set()

    loop.add_reader(spec.lifeline, supervisor_gone)
    access_log = AccessLog.from_env()
    access_log.start()
    try:
        await gateway.start()
        settle_garbage_collector()
        with os.fdopen(spec.ready, "wb") as ready:
            ready.write(READY)
        await stop.wait()
        await gateway.stop()
    finally:
        access_log.stop()
    if orphaned:  # no supervisor removes the sockets' directory: the last worker out does
        with contextlib.suppress(OSError):
            os.unlink(spec.socket_of(spec.index))
        with contextlib.suppress(OSError):
            os.rmdir(spec.sockets)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m framework.gateway.workers`: one worker, as its supervisor starts it."""
    from framework.runner import _install_uvloop

    spec = WorkerSpec.parse(sys.argv[1:] if argv is None else argv)
    try:
        with asyncio.Runner(loop_factory=_install_uvloop()) as runner:
            return runner.run(serve_worker(spec))
    except MsaError as exc:
        print(f"msa: error: gateway worker {spec.index}: {exc}", file=sys.stderr)
        return 2


# -- the supervisor ------------------------------------------------------------------------------


@contextlib.contextmanager
def _reserved(host: str, port: int) -> Iterator[int]:
    """Bind `host:port` without listening, for as long as the block runs; yields the port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as reservation:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            reservation.bind(address)
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        yield int(reservation.getsockname()[1])


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.StreamReader | None = None
    started: float = 0.0
    quick_deaths: int = 0
    keeper: asyncio.Task[None] | None = field(default=None, repr=False)


def _status(code: int) -> str:
    """A `returncode` in words: `exit code 1`, `signal SIGKILL`."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"signal {-code}"


class _Supervisor:
    """Starts, watches, restarts and stops the workers (see the module docstring)."""

    def __init__(self, config: Path, workers: int, port: int, admin_port: int, sockets: Path):
        self.config = config
        self.count = workers
        self.port = port
        self.admin_port = admin_port
        self.sockets = sockets
        self.workers = [_Worker(i) for i in range(workers)]
        self.stopping = asyncio.Event()
        # Only this process holds the write end; the workers inherit the read end.
        self.lifeline, self._lifeline_writer = os.pipe()

    def close(self) -> None:
        os.close(self.lifeline)
        os.close(self._lifeline_writer)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        try:
            for worker in self.workers:
                await self._spawn(worker)
            if await self._all_ready():
                print(
                    f"gateway listening on port {self.port} (admin {self.admin_port})", flush=True
                )
                for worker in self.workers:
                    worker.keeper = asyncio.create_task(
                        self._keep(worker), name=f"gateway-worker-{worker.index}"
                    )
                await self.stopping.wait()
        finally:
            clean = await self._stop()  # a repeated SIGTERM/SIGINT changes nothing meanwhile
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        return 0 if clean else 1

    async def _spawn(self, worker: _Worker) -> None:
        read, write = os.pipe()
        spec = WorkerSpec(
            config=self.config,
            index=worker.index,
            workers=self.count,
            port=self.port,
            admin_port=self.admin_port,
            sockets=self.sockets,
            lifeline=self.lifeline,
            ready=write,
        )
        try:
            with contextlib.suppress(FileNotFoundError):  # a dead worker's socket
                os.unlink(spec.socket_of(worker.index))
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "framework.gateway.workers",
                *spec.arguments(),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(self.lifeline, write),
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)  # the worker's copy is the only one: its death is end of file
        loop = asyncio.get_running_loop()
        worker.started = loop.time()
        worker.ready = ready = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(ready), os.fdopen(read, "rb")
        )
        if self.stopping.is_set():  # stopped while it was starting: _stop() may have missed it
            worker.process.send_signal(signal.SIGTERM)

    async def _wait_ready(self, worker: _Worker) -> bool:
        """Whether the worker said it listens (False: it exited first)."""
        assert worker.ready is not None
        assert worker.process is not None
        said = await worker.ready.readline()
        if said != READY:
            return False
        log.info("gateway worker %d (pid %d) listening", worker.index, worker.process.pid)
        return True

    async def _all_ready(self) -> bool:
        """Whether every worker listens; False when stopped first. A worker that exits
        before it listens fails the start at once."""
        pending = {asyncio.ensure_future(self._wait_ready(w)): w for w in self.workers}
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            while pending:
                done, _ = await asyncio.wait(
                    [*pending, stopped], return_when=asyncio.FIRST_COMPLETED
                )
                if stopped in done:
                    return False
                for task in done:
                    worker = pending.pop(task)
                    if not task.result():
                        assert worker.process is not None
                        code = await worker.process.wait()
                        raise MsaError(
                            f"gateway worker {worker.index} ended ({_status(code)}) before it "
                            "listened; its log is above"
                        )
            return True
        finally:
            for task in (*pending, stopped):
                task.cancel()
            await asyncio.gather(*pending, stopped, return_exceptions=True)

    async def _keep(self, worker: _Worker) -> None:
        """Restart `worker` whenever it exits, until the supervisor stops."""
        loop = asyncio.get_running_loop()
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self.stopping.is_set():
                return
            quick = loop.time() - worker.started < STABLE
            worker.quick_deaths = worker.quick_deaths + 1 if quick else 1
            delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (worker.quick_deaths - 1))
            log.warning(
                "gateway worker %d (pid %d) ended (%s); restarting it in %g s",
                worker.index,
                worker.process.pid,
                _status(code),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return
            try:
                await self._spawn(worker)
            except OSError:  # no process: the next round finds the old one ended, and waits
                log.exception("gateway worker %d could not be started", worker.index)
                continue
            await self._wait_ready(worker)  # if it dies first, the next round says so

    async def _stop(self) -> bool:
        """SIGTERM to every worker; True once all have exited with 0."""
        self.stopping.set()
        running = [
            w for w in self.workers if w.process is not None and w.process.returncode is None
        ]
        if running:
            log.info("gateway: stopping %d workers", len(running))
        for worker in running:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        keepers = [w.keeper for w in self.workers if w.keeper is not None]
        await asyncio.gather(*keepers)
        clean = True
        for worker in self.workers:
            if worker.process is None:
                continue
            code = await worker.process.wait()
            if code != 0 and worker in running:
                log.warning(
                    "gateway worker %d ended (%s) while stopping", worker.index, _status(code)
                )
                clean = False
        return clean


async def supervise(config: str | Path, workers: int) -> int:
    """Run `workers` gateway processes on the config's port until SIGTERM/SIGINT (the module
    docstring); the exit status (0: every worker stopped cleanly)."""
    configure_logging("gateway")
    path = Path(config)
    settings = load_config(path).gateway
    with (
        _reserved(settings.listen.host, settings.listen.port) as port,
        _reserved(settings.admin.host, settings.admin.port) as admin_port,
        tempfile.TemporaryDirectory(prefix="msa-gateway-") as sockets,  # mode 0700
    ):
        supervisor = _Supervisor(path, workers, port, admin_port, Path(sockets))
        try:
            return await supervisor.run()
        finally:
            supervisor.close()


if __name__ == "__main__":
    # `python -m framework.gateway.workers`: run the imported module's main, so the worker uses
    # the classes every other module sees (not this `__main__` copy's).
    from framework.gateway.workers import main as imported_main

    sys.exit(imported_main())
