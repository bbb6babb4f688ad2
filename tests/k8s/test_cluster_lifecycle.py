"""`scripts/cluster down` puts the host back as it was, and `up` brings the cluster back.

Runs after tests/k8s/test_cluster.py (file order): the cluster that scripts/test started is
taken down here, the host compared with the record `up` took before it changed anything, and
the cluster started again (so the run's final `down` checks the host a second time).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.k8s.test_cluster import CLUSTER, require_cluster

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("msa_cluster", REPO / "scripts" / "cluster.py")
assert _spec is not None
assert _spec.loader is not None
cluster = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cluster  # its dataclasses look themselves up there
_spec.loader.exec_module(cluster)


def test_down_restores_the_host_and_up_starts_again() -> None:
    paths = cluster.Paths.from_env()
    require_cluster()
    before: dict[str, Any] = json.loads(paths.state.read_text())["host"]
    # The running cluster did change the host: the kubelet set its kernel defaults.
    changed = {
        name: (value, cluster.read_sysctl(name))
        for name, value in before["sysctls"].items()
        if cluster.read_sysctl(name) != value
    }
    assert changed, "the kubelet changed no host sysctl: this test would prove nothing"

    down = subprocess.run([*CLUSTER, "down"], capture_output=True, text=True, check=False)
    assert down.returncode == 0, down.stderr

    after = cluster.host_record()
    assert after["sysctls"] == before["sysctls"], changed
    assert after["iptables"] == before["iptables"]
    for key in ("links", "addresses", "routes", "mounts", "cgroups", "netns", "folders"):
        assert after[key] == before[key], key
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    assert not [line for line in mounts if str(paths.run) in line]

    up = subprocess.run([*CLUSTER, "up"], capture_output=True, text=True, check=False)
    assert up.returncode == 0, up.stderr[-3000:]
    assert subprocess.run([*CLUSTER, "status"], capture_output=True, check=False).returncode == 0
