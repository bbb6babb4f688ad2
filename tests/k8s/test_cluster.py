"""The Kubernetes manifests on a real cluster: `k8s/overlays/local` applied to the single-node
cluster of `scripts/cluster` (Kubernetes built from source, images built offline), then the shop
used through its gateway the way a user meets it.

- every rollout and Job finishes;
- a buyer signs up, places an order and sees it confirmed;
- `orders` and `inventory` are rolled (a new ReplicaSet each) while buyers place orders: no
  request fails and every accepted order ends as its card and stock dictate;
- an `orders` pod is deleted while buyers place orders: it is replaced, no request fails and
  nothing is lost (the deleted pod's log is kept in `$MSA_CLUSTER_DIR/logs/`);
- the NetworkPolicies hold (kube-router enforces them): a service reaches its own database
  server, not another's.

The load runs as its own OS process (tests/k8s/shop_client.py) inside the cluster's network
namespace, the node, and reaches the gateway through its NodePort Service. The figures of each
run are written to `$MSA_CLUSTER_DIR/logs/e2e-figures.json` and printed.

`scripts/test` brings the cluster up before pytest and takes it down afterwards (checking that
the host is as before). Without a cluster these tests fail under CI/MSA_REQUIRE_SERVERS=1 and are
skipped otherwise, like every real-server test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import servers_required

REPO = Path(__file__).resolve().parents[2]
CLUSTER = [sys.executable, str(REPO / "scripts" / "cluster.py")]
NAMESPACE = "shop"
GATEWAY = "http://10.97.0.1:30080"
ROLLOUT_TIMEOUT = "600s"
RUN_DIR = Path(os.environ.get("MSA_CLUSTER_DIR", "/tmp/msa-cluster"))
FIGURES = RUN_DIR / "logs" / "e2e-figures.json"
# Orders per second in total during a disruption: steady work for two services on two cores.
LOAD_RATE = "4"
ADMIN = ("admin@shop.test", "dev-only-admin-password")  # k8s/overlays/dev's shop-admin Secret

pytestmark = pytest.mark.timeout(1800)


def kubectl(*args: str, check: bool = True, timeout: float = 900) -> str:
    result = subprocess.run(
        [*CLUSTER, "kubectl", "--", "-n", NAMESPACE, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr or result.stdout}")
    return result.stdout


def client_command(*args: str) -> list[str]:
    return [
        *CLUSTER,
        "exec",
        "--",
        sys.executable,
        "-m",
        "tests.k8s.shop_client",
        "--base",
        GATEWAY,
        *args,
    ]


def record(name: str, figures: dict[str, Any]) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    known[name] = figures
    FIGURES.write_text(json.dumps(known, indent=2))
    print(f"\n{name}: {json.dumps(figures, indent=2)}")


def require_cluster() -> None:
    """Fails (CI, MSA_REQUIRE_SERVERS=1) or skips the test when no cluster is up."""
    status = subprocess.run([*CLUSTER, "status"], capture_output=True, text=True, check=False)
    if status.returncode != 0:
        problem = f"no Kubernetes cluster is up (scripts/cluster up): {status.stdout.strip()}"
        if servers_required():
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def shop() -> Iterator[None]:
    require_cluster()
    kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true")
    began = time.monotonic()
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / "local")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    applied = subprocess.run(
        [*CLUSTER, "kubectl", "--", "apply", "--server-side", "-f", "-"],
        input=rendered,
        capture_output=True,
        text=True,
        check=False,
    )
    assert applied.returncode == 0, applied.stderr
    for kind in ("statefulset", "deployment"):
        for name in kubectl("get", kind, "-o", "name").split():
            kubectl("rollout", "status", name, f"--timeout={ROLLOUT_TIMEOUT}")
    kubectl("wait", "--for=condition=complete", "job", "--all", f"--timeout={ROLLOUT_TIMEOUT}")
    record("deploy", {"seconds_to_every_rollout_and_job": round(time.monotonic() - began, 1)})
    yield
    keep_logs("shop-pods.log")
    kubectl("delete", "namespace", NAMESPACE, "--wait=true", check=False)


def keep_logs(name: str, *selectors: str) -> None:
    """The logs of the shop's pods (those of `selectors`, else all) into the run's logs folder,
    which `scripts/cluster down` keeps, for a failure to be read after the cluster is gone."""
    chosen = selectors or ("app.kubernetes.io/name",)
    with (RUN_DIR / "logs" / name).open("w") as out:
        for selector in chosen:
            out.write(
                kubectl(
                    "logs",
                    "-l",
                    selector,
                    "--all-containers",
                    "--prefix",
                    "--tail=-1",
                    "--max-log-requests=50",
                    check=False,
                )
            )


def run_client(*args: str, timeout: float = 600) -> dict[str, Any]:
    result = subprocess.run(
        client_command(*args), capture_output=True, text=True, check=False, timeout=timeout
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_a_buyer_orders_through_the_gateway(shop: None) -> None:
    report = run_client("smoke")
    record("smoke", report)
    assert report["ok"], report
    assert report["status"] == "confirmed"


class Load:
    """The shop client placing orders in its own process until `stop` is called.

    It signs in as the dev overlay's admin too, to restock the products it sells and read the
    stock before and after (conservation). `started` returns once its first order is out."""

    def __init__(self, tmp_path: Path) -> None:
        self.until = tmp_path / "stop-placing-orders"
        self.began = tmp_path / "placing-orders"
        self.process = subprocess.Popen(
            client_command(
                "load",
                "--buyers",
                "4",
                "--rate",
                LOAD_RATE,
                "--until-file",
                str(self.until),
                "--started-file",
                str(self.began),
                "--admin-email",
                ADMIN[0],
                "--admin-password",
                ADMIN[1],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def started(self) -> None:
        deadline = time.monotonic() + 300
        while not self.began.exists():
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "the load client never placed its first order"
            time.sleep(0.2)

    def stop(self) -> dict[str, Any]:
        self.until.touch()
        out, err = self.process.communicate(timeout=600)
        assert out.strip(), err[-3000:]
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return report


def pods(selector: str) -> set[str]:
    """The pods matching `selector`, without those already terminating."""
    listed = json.loads(kubectl("get", "pods", "-l", selector, "-o", "json"))
    return {
        f"pod/{pod['metadata']['name']}"
        for pod in listed["items"]
        if not pod["metadata"].get("deletionTimestamp")
    }


def test_rolling_update_under_load_fails_no_request(shop: None, tmp_path: Path) -> None:
    load = Load(tmp_path)
    try:
        load.started()
        before = {name: pods(f"app.kubernetes.io/name={name}") for name in ("orders", "inventory")}
        began = time.monotonic()
        kubectl("rollout", "restart", "deployment/orders", "deployment/inventory")
        for name in ("orders", "inventory"):
            kubectl("rollout", "status", f"deployment/{name}", f"--timeout={ROLLOUT_TIMEOUT}")
        rolled = round(time.monotonic() - began, 1)
    finally:
        report = load.stop()
    after = {name: pods(f"app.kubernetes.io/name={name}") for name in ("orders", "inventory")}
    record("rolling_update", {"rollout_seconds": rolled, **report})
    for name in ("orders", "inventory"):
        assert after[name], (name, after)
        assert not after[name] & before[name], (name, before, after)
    assert report["ok"], report
    assert report["failures"] == 0
    assert report["accepted"] > 0


def test_a_deleted_pod_is_replaced_and_nothing_is_lost(shop: None, tmp_path: Path) -> None:
    load = Load(tmp_path)
    try:
        load.started()
        (victim, *_) = sorted(pods("app.kubernetes.io/name=orders"))
        # The pod's log goes with it: follow it into the logs folder until it ends.
        with (RUN_DIR / "logs" / f"deleted-{victim.removeprefix('pod/')}.log").open("w") as log:
            follower = subprocess.Popen(
                [*CLUSTER, "kubectl", "--", "-n", NAMESPACE, "logs", "-f", victim],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            began = time.monotonic()
            kubectl("delete", victim, "--wait=true")
            kubectl("rollout", "status", "deployment/orders", f"--timeout={ROLLOUT_TIMEOUT}")
            replaced = round(time.monotonic() - began, 1)
            follower.wait(timeout=60)
        now = pods("app.kubernetes.io/name=orders")
    finally:
        report = load.stop()
        keep_logs("pod-deletion-orders.log", "app.kubernetes.io/name=orders")
    record("pod_deletion", {"replaced_seconds": replaced, **report})
    assert victim not in now, (victim, now)
    assert len(now) >= 2, now
    assert report["ok"], report
    assert report["failures"] == 0


PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\n"
    "    print('open')\n"
    "except OSError as error:\n"
    "    print('closed', type(error).__name__)\n"
)


def reaches(service: str, host: str, port: int) -> bool:
    out = kubectl("exec", f"deploy/{service}", "--", "python", "-c", PROBE, host, str(port))
    return out.strip() == "open"


def test_network_policies_keep_each_service_to_its_own_database(shop: None) -> None:
    """kube-router enforces the NetworkPolicies: a service reaches its own database server and
    not another's (dev runs one PostgreSQL and one MongoDB server for all services)."""
    assert reaches("orders", "postgres", 5432)
    assert reaches("catalog", "mongo", 27017)
    assert not reaches("catalog", "postgres", 5432)
    assert not reaches("orders", "mongo", 27017)
    assert not reaches("storefront", "postgres", 5432)
