"""A real single-node Kubernetes cluster on this machine, built from source, for the k8s e2e test.

    scripts/cluster up        build what is missing, start the cluster, wait until it is ready
    scripts/cluster down      stop everything and put the host back as it was (checked)
    scripts/cluster status    one line per component
    scripts/cluster kubectl ARGS...   kubectl against the cluster
    scripts/cluster exec -- CMD...    run CMD inside the cluster's network namespace (the node),
                                      with KUBECONFIG set: the node reaches Service IPs and pods

Everything runs inside a network namespace and a mount namespace that this script
creates. The node's address (10.97.0.1) is on a veth interface in that namespace, pods sit on a
bridge (cni0, 10.244.0.0/24) that the bridge CNI plugin creates there, Services are 10.96.0.0/16,
and the default route points at that interface, whose peer (in the namespace too) drops what it
gets: nothing in the cluster can reach another host, and no rule, route, interface or mount is
added to the host's namespaces.
kube-proxy's iptables chains live in the cluster's namespace and go with it.

What does touch the host, and what `down` undoes:
- the kubelet sets kernel.panic, kernel.panic_on_oops, vm.overcommit_memory and the kernel keyring
  limits (host-wide sysctls): they are recorded before `up` and written back by `down`;
- the kubelet and containerd create cgroups (kubepods, ...) in the host's cgroup hierarchies:
  `down` kills what is left in them and removes them;
- the folders the mount namespace binds over (/var/lib/cni, /var/log/pods, ...) are created on
  the host if missing, and removed again.
`down` then compares the host with the record taken before `up` (sysctls, iptables rules, links,
addresses, routes, mounts, cgroups) and fails, naming the difference, if anything changed.

Binaries come from scripts/lib/cluster-build.sh (Kubernetes, etcd, CoreDNS and the local-path
provisioner from the Go module proxy), images from scripts/lib/cluster-images.sh (built offline,
imported into containerd, never pulled); Debian packages give containerd, runc, the CNI plugins
and iptables.

Environment: MSA_CACHE_DIR (the build cache), MSA_CLUSTER_DIR (run folder, default
/tmp/msa-cluster; the namespaces are files in it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent
K8S_VERSION = "v1.34.2"
ETCD_VERSION = "v3.6.4"
KUBE_ROUTER_VERSION = "v2.10.0"
COREDNS_VERSION = "v1.12.1"
LOCAL_PATH_VERSION = "v0.0.30"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.1"
COREDNS_IMAGE = f"registry.k8s.io/coredns/coredns:{COREDNS_VERSION}"
LOCAL_PATH_IMAGE = f"msa.local/local-path-provisioner:{LOCAL_PATH_VERSION}"
BUSYBOX_IMAGE = "msa.local/busybox:1.36.1"
NODE = "msa-node"
NODE_IP = "10.97.0.1"
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
DNS_IP = "10.96.0.10"
APT_PACKAGES = (
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "debootstrap",  # the images' Debian base (scripts/lib/cluster-images.sh)
    "buildah",  # the shop image from the Dockerfile
    "ipset",  # kube-router's NetworkPolicy rules
)
CNI_BIN = Path("/usr/lib/cni")
ETCD_HEALTH = "http://127.0.0.1:2379/health"
KUBE_ROUTER_HEALTH = "http://127.0.0.1:20244/healthz"
GET = "import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=5).read().decode())"
# Host-wide sysctls the kubelet writes (protectKernelDefaults: false), restored by `down`.
HOST_SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.netfilter.nf_conntrack_max",
    "net.ipv4.ip_forward",
    "net.bridge.bridge-nf-call-iptables",
)
# Host folders the cluster's mount namespace covers with a folder of the run directory.
BIND_OVER = (
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/run/netns",  # containerd pins pod network namespaces here
)
# Stop order: the kubelet first (it would restart containers), etcd last.
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
    "kube-router",
)


class ClusterError(RuntimeError):
    """The cluster could not be built, started or stopped; the message says which step and why."""


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Paths:
    cache: Path
    run: Path

    @classmethod
    def from_env(cls) -> Paths:
        cache = Path(
            os.environ.get("MSA_CACHE_DIR")
            or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "msa-framework"
        )
        run = Path(os.environ.get("MSA_CLUSTER_DIR", "/tmp/msa-cluster"))
        return cls(cache=cache, run=run)

    @property
    def bin(self) -> Path:
        return self.cache / "cluster" / "bin"

    @property
    def pki(self) -> Path:
        return self.run / "pki"

    @property
    def logs(self) -> Path:
        return self.run / "logs"

    @property
    def state(self) -> Path:
        return self.run / "state.json"

    @property
    def mntns(self) -> Path:
        return self.run / "ns" / "mnt"

    @property
    def kubeconfig(self) -> Path:
        return self.run / "admin.kubeconfig"

    @property
    def containerd_sock(self) -> Path:
        return self.run / "containerd" / "containerd.sock"

    def binary(self, name: str) -> Path:
        version = {"etcd": ETCD_VERSION, "kube-router": KUBE_ROUTER_VERSION}.get(name, K8S_VERSION)
        return self.bin / f"{name}-{version}"


# ---------------------------------------------------------------------------------------------
# Host record: what `down` must leave as it was.


def _run(args: Sequence[str | Path], *, check: bool = True, **kwargs: object) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        check=False,
        capture_output=True,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )
    if check and result.returncode != 0:
        raise ClusterError(
            f"{' '.join(map(str, args))}: exit {result.returncode}: {result.stderr.strip()}"
        )
    return str(result.stdout)


def read_sysctl(name: str) -> str | None:
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        return path.read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    (Path("/proc/sys") / name.replace(".", "/")).write_text(value + "\n")


def cgroup_dirs() -> list[str]:
    """Every cgroup folder the cluster could have made, in every v1 hierarchy (or v2)."""
    found = []
    root = Path("/sys/fs/cgroup")
    for hierarchy in sorted(root.iterdir()) if root.is_dir() else []:
        for name in ("kubepods", "kubepods.slice", "system.slice/containerd.service", "msa-k8s"):
            if (hierarchy / name).exists():
                found.append(str(hierarchy / name))
    return found


def host_record() -> dict[str, object]:
    """A picture of the host's network, sysctls, mounts and cgroups, to compare after `down`."""
    iptables = {
        tool: _strip_counters(_run([tool], check=False))
        for tool in ("iptables-save", "ip6tables-save")
        if shutil.which(tool)
    }
    return {
        "sysctls": {name: read_sysctl(name) for name in HOST_SYSCTLS},
        "iptables": iptables,
        "links": sorted(_run(["ip", "-o", "link", "show"]).split("\n")),
        "addresses": sorted(_run(["ip", "-o", "addr", "show"]).split("\n")),
        "routes": sorted(_run(["ip", "route", "show", "table", "all"]).split("\n")),
        "mounts": sorted(
            " ".join(line.split()[1:3])
            for line in Path("/proc/self/mounts").read_text().splitlines()
        ),
        "cgroups": cgroup_dirs(),
        "netns": sorted(_run(["ip", "netns", "list"]).split("\n")),
        "folders": {target: Path(target).exists() for target in BIND_OVER},
    }


def _strip_counters(text: str) -> list[str]:
    # Packet counters and the date comments change by themselves; rules and chains must not.
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":"):
            line = line.split(" [", 1)[0]
        lines.append(line)
    return lines


def compare_records(before: dict[str, object], after: dict[str, object]) -> list[str]:
    differences = []
    for key in before:
        if before[key] != after.get(key):
            differences.append(f"{key}: before {before[key]!r}, after {after.get(key)!r}")
    return differences


# ---------------------------------------------------------------------------------------------
# Certificates: one CA signs the servers' and every client's certificate.


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common: str, org: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if org:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(parts)


def write_pki(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=7)
    ca_key = _key()
    ca_name = _name("msa-cluster-ca")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(pki / "ca.key", ca_key)

    def issue(
        name: str, common: str, org: str | None, *, server: bool = False, sans: Sequence[str] = ()
    ) -> None:
        key = _key()
        alt: list[x509.GeneralName] = []
        for san in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                alt.append(x509.DNSName(san))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
            [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common, org))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (pki / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(pki / f"{name}.key", key)

    issue(
        "apiserver",
        "kube-apiserver",
        None,
        server=True,
        sans=(
            API_SERVICE_IP,
            NODE_IP,
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
    )
    issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
    issue("admin", "msa-admin", "system:masters")
    issue("front-proxy-client", "front-proxy-client", None)
    issue("controller-manager", "system:kube-controller-manager", None)
    issue("scheduler", "system:kube-scheduler", None)
    issue("kube-proxy", "system:kube-proxy", None)
    issue("kube-router", "system:kube-router", None)
    issue("kubelet", f"system:node:{NODE}", "system:nodes", server=True, sans=(NODE_IP, NODE))
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def write_kubeconfig(path: Path, pki: Path, user: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "msa",
                "cluster": {
                    "server": f"https://{NODE_IP}:6443",
                    "certificate-authority": str(pki / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(pki / f"{user}.crt"),
                    "client-key": str(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": "msa", "context": {"cluster": "msa", "user": user}}],
        "current-context": "msa",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)


# ---------------------------------------------------------------------------------------------
# Namespaces: one network and one mount namespace, held open by files in the run folder.


def ns_prefix(paths: Paths) -> list[str]:
    return ["nsenter", f"--net={paths.run / 'ns' / 'net'}", f"--mount={paths.mntns}", "--"]


def in_cluster(
    paths: Paths, args: Sequence[str | Path], *, check: bool = True, **kwargs: object
) -> str:
    return _run([*ns_prefix(paths), *args], check=check, **kwargs)


def make_namespaces(paths: Paths, state: dict[str, object]) -> None:
    ns = paths.run / "ns"
    ns.mkdir(parents=True, exist_ok=True)
    # The namespace files are bind mounts; their folder must be a private mount of its own.
    _run(["mount", "--bind", ns, ns])
    _run(["mount", "--make-private", ns])
    (ns / "net").touch()
    paths.mntns.touch()
    _run(
        [
            "unshare",
            f"--net={ns / 'net'}",
            f"--mount={paths.mntns}",
            "--propagation",
            "private",
            "true",
        ]
    )
    created = []
    binds = []
    for target in BIND_OVER:
        host = Path(target)
        if not host.exists():
            created.append(target)
            state["created_dirs"] = created
            save_state(paths, state)
            host.mkdir(parents=True)
        source = paths.run / "host" / target.strip("/").replace("/", "-")
        source.mkdir(parents=True, exist_ok=True)
        binds.append(f"mount --bind {source} {target}")
    state["created_dirs"] = created
    save_state(paths, state)  # before anything can fail: `down` must find what to remove
    setup = " && ".join(
        [
            *binds,
            # The kubelet and containerd share mounts (volumes, rootfs) with the containers.
            "mount --make-rshared /",
            "ip link set lo up",
            # The node's interface: one end of a veth pair whose other end has no address, so
            # whatever leaves by the default route ends there.
            "ip link add msa0 type veth peer name msa0-sink",
            f"ip addr add {NODE_IP}/24 dev msa0",
            "ip link set msa0-sink up",
            "ip link set msa0 up",
            "ip route add default dev msa0",
            "sysctl -qw net.ipv4.ip_forward=1",
            "sysctl -qw net.ipv4.conf.all.route_localnet=1",
            "sysctl -qw net.bridge.bridge-nf-call-iptables=1",
        ]
    )
    in_cluster(paths, ["sh", "-c", setup])


def remove_namespaces(paths: Paths, state: dict[str, object]) -> None:
    ns = paths.run / "ns"
    for name in ("mnt", "net"):
        if (ns / name).exists():
            _run(["umount", ns / name], check=False)
    if ns.exists():
        _run(["umount", ns], check=False)
    for target in reversed(list(state.get("created_dirs", []))):  # type: ignore[call-overload]
        try:
            Path(target).rmdir()
        except OSError as error:
            log(f"could not remove {target}: {error}")


# ---------------------------------------------------------------------------------------------
# Configuration files.


def write_configs(paths: Paths) -> None:
    run, pki = paths.run, paths.pki
    for user in (
        "admin",
        "controller-manager",
        "scheduler",
        "kubelet",
        "kube-proxy",
        "kube-router",
    ):
        write_kubeconfig(run / f"{user}.kubeconfig", pki, user)
    paths.kubeconfig.write_text((run / "admin.kubeconfig").read_text())
    (run / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    cni = run / "cni" / "net.d"
    cni.mkdir(parents=True, exist_ok=True)
    (cni / "10-msa.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "msa-pods",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "cni0",
                        "isGateway": True,
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_CIDR}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": str(run / "cni" / "ipam"),
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}},
                ],
            },
            indent=2,
        )
    )
    ctr = run / "containerd"
    ctr.mkdir(parents=True, exist_ok=True)
    (ctr / "config.toml").write_text(
        f"""version = 2
root = "{ctr / "root"}"
state = "{ctr / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{paths.containerd_sock}"
[ttrpc]
  address = "{ctr / "containerd.sock.ttrpc"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{ctr / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM lacks CAP_SYS_RESOURCE: without this every sandbox fails to start.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni}"
"""
    )
    (run / "kubelet.yaml").write_text(
        json.dumps(
            {
                "apiVersion": "kubelet.config.k8s.io/v1beta1",
                "kind": "KubeletConfiguration",
                "authentication": {
                    "anonymous": {"enabled": False},
                    "webhook": {"enabled": True},
                    "x509": {"clientCAFile": str(pki / "ca.crt")},
                },
                "authorization": {"mode": "Webhook"},
                "cgroupDriver": "cgroupfs",
                # This VM runs cgroups v1.
                "failCgroupV1": False,
                "containerRuntimeEndpoint": f"unix://{paths.containerd_sock}",
                "clusterDNS": [DNS_IP],
                "clusterDomain": "cluster.local",
                "resolvConf": str(run / "resolv.conf"),
                "tlsCertFile": str(pki / "kubelet.crt"),
                "tlsPrivateKeyFile": str(pki / "kubelet.key"),
                "failSwapOn": False,
                "readOnlyPort": 0,
                "healthzBindAddress": "127.0.0.1",
                "podCIDR": POD_CIDR,
                "serializeImagePulls": False,
                "protectKernelDefaults": False,
                # A shared development disk: evict only when it is really full.
                "evictionHard": {
                    "memory.available": "200Mi",
                    "nodefs.available": "2%",
                    "imagefs.available": "2%",
                },
                "imageGCHighThresholdPercent": 99,
                "imageGCLowThresholdPercent": 98,
                "containerLogMaxSize": "10Mi",
            },
            indent=2,
        )
    )
    (run / "kube-proxy.yaml").write_text(
        json.dumps(
            {
                "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                "kind": "KubeProxyConfiguration",
                "clientConnection": {"kubeconfig": str(run / "kube-proxy.kubeconfig")},
                "mode": "iptables",
                "clusterCIDR": CLUSTER_CIDR,
                "hostnameOverride": NODE,
                # 0: leave the host-wide conntrack table size and timeouts alone.
                "conntrack": {
                    "maxPerCore": 0,
                    "min": 0,
                    "tcpEstablishedTimeout": "0s",
                    "tcpCloseWaitTimeout": "0s",
                },
                "nodePortAddresses": ["primary"],
                "metricsBindAddress": "127.0.0.1:10249",
                "healthzBindAddress": "127.0.0.1:10256",
            },
            indent=2,
        )
    )


def component_args(paths: Paths, name: str) -> list[str]:
    run, pki = paths.run, paths.pki
    binary = str(paths.binary(name)) if name != "containerd" else "containerd"
    if name == "etcd":
        return [
            binary,
            "--name=msa",
            f"--data-dir={run / 'etcd'}",
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=msa=http://127.0.0.1:2380",
            # A throw-away test cluster on a shared disk: no fsync per write.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]
    if name == "kube-apiserver":
        return [
            binary,
            f"--advertise-address={NODE_IP}",
            "--bind-address=0.0.0.0",
            "--secure-port=6443",
            "--etcd-servers=http://127.0.0.1:2379",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            "--profiling=false",
            # The aggregation layer (for metrics-server and the like): requests the API server
            # proxies carry the user in these headers, signed by the cluster's CA.
            f"--requestheader-client-ca-file={pki / 'ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
        ]
    if name == "kube-controller-manager":
        kubeconfig = str(run / "controller-manager.kubeconfig")
        return [
            binary,
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--allocate-node-cidrs=true",
            f"--cluster-cidr={CLUSTER_CIDR}",
            "--node-cidr-mask-size=24",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            "--use-service-account-credentials=true",
            "--profiling=false",
        ]
    if name == "kube-scheduler":
        kubeconfig = str(run / "scheduler.kubeconfig")
        return [
            binary,
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--profiling=false",
        ]
    if name == "containerd":
        return [binary, f"--config={run / 'containerd' / 'config.toml'}"]
    if name == "kubelet":
        return [
            binary,
            f"--config={run / 'kubelet.yaml'}",
            f"--kubeconfig={run / 'kubelet.kubeconfig'}",
            f"--root-dir={run / 'kubelet'}",
            f"--hostname-override={NODE}",
            f"--node-ip={NODE_IP}",
        ]
    if name == "kube-proxy":
        return [binary, f"--config={run / 'kube-proxy.yaml'}"]
    if name == "kube-router":
        # NetworkPolicy only (the bridge CNI enforces none): iptables and ipsets in the cluster's
        # network namespace; routing and Services stay with the bridge and kube-proxy.
        return [
            binary,
            f"--kubeconfig={run / 'kube-router.kubeconfig'}",
            f"--hostname-override={NODE}",
            "--run-firewall=true",
            "--run-router=false",
            "--run-service-proxy=false",
            "--enable-cni=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--health-addr=127.0.0.1",
            "--health-port=20244",
            "--metrics-addr=127.0.0.1",
            "--metrics-port=20245",
        ]
    raise ClusterError(f"unknown component {name}")


# ---------------------------------------------------------------------------------------------
# Processes.


def start_component(paths: Paths, state: dict[str, object], name: str) -> None:
    paths.logs.mkdir(parents=True, exist_ok=True)
    with open(paths.logs / f"{name}.log", "ab") as out:
        process = subprocess.Popen(
            [*ns_prefix(paths), *component_args(paths, name)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PATH": f"{paths.bin}:{os.environ['PATH']}"},
        )
    pids: dict[str, int] = state.setdefault("pids", {})  # type: ignore[assignment]
    pids[name] = process.pid
    save_state(paths, state)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_for(
    what: str,
    check: Callable[[], bool],
    *,
    timeout: float,
    paths: Paths,
    component: str | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    state = load_state(paths)
    while True:
        try:
            if check():
                return
        except (ClusterError, OSError):
            pass
        if component is not None:
            pid = state.get("pids", {}).get(component)  # type: ignore[attr-defined]
            if pid is not None and not alive(pid):
                raise ClusterError(
                    f"{component} exited while waiting for {what}:\n{tail(paths, component)}"
                )
        if time.monotonic() > deadline:
            detail = tail(paths, component) if component else ""
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")
        time.sleep(0.5)


def start_and_wait(
    paths: Paths, state: dict[str, object], name: str, ready: Callable[[], bool]
) -> None:
    start_component(paths, state, name)
    wait_for(f"{name} to answer", ready, timeout=120, paths=paths, component=name)


def get(paths: Paths, url: str) -> str:
    """The body at `url`, fetched from inside the cluster's network namespace."""
    return in_cluster(paths, ["python3", "-c", GET, url])


def tail(paths: Paths, component: str, lines: int = 30) -> str:
    try:
        return "\n".join(
            (paths.logs / f"{component}.log").read_text(errors="replace").splitlines()[-lines:]
        )
    except OSError:
        return ""


def stop_pid(pid: int, name: str, grace: float) -> None:
    if not alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        log(f"{name} did not stop in {grace:.0f}s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def kill_cgroups() -> None:
    """Kills every process left in the cluster's cgroups (containers, shims), then removes them."""
    for _ in range(50):
        left = False
        for top in cgroup_dirs():
            # os.walk, not rglob: folders vanish while we walk (their last process exits).
            for here, _, _ in os.walk(top):
                try:
                    pids = [int(p) for p in (Path(here) / "cgroup.procs").read_text().split()]
                except OSError:
                    continue
                for pid in pids:
                    left = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if not left:
            break
        time.sleep(0.1)
    for top in cgroup_dirs():
        # Deepest first: a cgroup folder goes only once it has no children.
        for here, _, _ in sorted(os.walk(top), key=lambda walked: -walked[0].count("/")):
            with contextlib.suppress(OSError):
                Path(here).rmdir()
        if Path(top).exists():
            log(f"could not remove cgroup {top}")


def kill_namespace_members(paths: Paths) -> None:
    """SIGKILLs every process still in the cluster's network or mount namespace (containerd's
    shims, which leave containerd's session and cgroup): none may outlive `down`."""
    wanted = set()
    for name in ("net", "mnt"):
        with contextlib.suppress(OSError):
            wanted.add(f"{name}:[{(paths.run / 'ns' / name).stat().st_ino}]")
    if not wanted:
        return
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for name in ("net", "mnt"):
            try:
                member = os.readlink(entry / "ns" / name) in wanted
            except OSError:
                continue
            if member:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
                break


def load_state(paths: Paths) -> dict[str, object]:
    try:
        return dict(json.loads(paths.state.read_text()))
    except (OSError, ValueError):
        return {}


def save_state(paths: Paths, state: dict[str, object]) -> None:
    paths.state.write_text(json.dumps(state, indent=2))


def kubectl(paths: Paths, *args: str, check: bool = True, input: str | None = None) -> str:
    return in_cluster(
        paths,
        [paths.binary("kubectl"), f"--kubeconfig={paths.kubeconfig}", *args],
        check=check,
        input=input,
    )


# ---------------------------------------------------------------------------------------------
# up, down, status.


class Phases:
    """Prints how long each phase took: the budget for CI is per phase."""

    def __init__(self) -> None:
        self.began = self.phase_began = time.monotonic()
        self.name = ""

    def __call__(self, name: str) -> None:
        self.end()
        self.name, self.phase_began = name, time.monotonic()
        log(f"{name} ...")

    def end(self) -> None:
        if self.name:
            log(f"{self.name}: {time.monotonic() - self.phase_began:.0f}s")
            self.name = ""


def ensure_packages() -> None:
    missing = [
        p
        for p in APT_PACKAGES
        if _run(["dpkg-query", "-W", "-f=${Status}", p], check=False) != "install ok installed"
    ]
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=False).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env)
        _run(install, env=env)


def build(paths: Paths) -> None:
    env = {**os.environ, "MSA_CACHE_DIR": str(paths.cache)}
    for script, args in (("cluster-build.sh", []), ("cluster-images.sh", ["build"])):
        subprocess.run(["bash", str(REPO / "scripts" / "lib" / script), *args], check=True, env=env)


def running(paths: Paths) -> dict[str, bool]:
    pids: dict[str, int] = load_state(paths).get("pids", {})  # type: ignore[assignment]
    return {name: name in pids and alive(pids[name]) for name in COMPONENTS}


def up(paths: Paths) -> None:
    if os.geteuid() != 0:
        raise ClusterError("the cluster needs root (namespaces, mounts, cgroups)")
    if all(running(paths).values()) and _node_ready(paths):
        log("already running")
        return
    if any(running(paths).values()) or paths.state.exists():
        log("a previous cluster was left behind: taking it down first")
        down(paths, check_host=False)
    phases = Phases()
    phases("packages")
    ensure_packages()
    phases("binaries and images")
    build(paths)
    phases("namespaces, certificates, configuration")
    clear_run_folder(paths)
    paths.run.mkdir(parents=True, exist_ok=True)
    state: dict[str, object] = {"host": host_record()}
    save_state(paths, state)
    make_namespaces(paths, state)
    save_state(paths, state)
    write_pki(paths.pki)
    write_configs(paths)
    phases("control plane")
    start_and_wait(paths, state, "etcd", lambda: '"health":"true"' in get(paths, ETCD_HEALTH))
    start_and_wait(
        paths, state, "kube-apiserver", lambda: kubectl(paths, "get", "--raw", "/readyz") == "ok"
    )
    for name in ("kube-controller-manager", "kube-scheduler", "containerd"):
        start_component(paths, state, name)
    wait_for(
        "containerd", paths.containerd_sock.exists, timeout=60, paths=paths, component="containerd"
    )
    phases("images into containerd")
    subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "lib" / "cluster-images.sh"),
            "load",
            str(paths.containerd_sock),
        ],
        check=True,
        env={**os.environ, "MSA_CACHE_DIR": str(paths.cache)},
    )
    phases("node")
    for name in ("kubelet", "kube-proxy"):
        start_component(paths, state, name)
    wait_for(
        "the node to be Ready",
        lambda: _node_ready(paths),
        timeout=180,
        paths=paths,
        component="kubelet",
    )
    phases("cluster DNS, storage and NetworkPolicy")
    apply_addons(paths)
    # After the node has its address and the add-ons its permissions.
    start_and_wait(paths, state, "kube-router", lambda: "OK" in get(paths, KUBE_ROUTER_HEALTH))
    for namespace, deployment in (
        ("kube-system", "coredns"),
        ("local-path-storage", "local-path-provisioner"),
    ):
        kubectl(
            paths,
            "-n",
            namespace,
            "rollout",
            "status",
            f"deployment/{deployment}",
            "--timeout=180s",
        )
    phases.end()
    log(f"ready in {time.monotonic() - phases.began:.0f}s: scripts/cluster kubectl get nodes")


def clear_run_folder(paths: Paths) -> None:
    """Everything of a cluster's run folder but its logs (the e2e test's figures among them)."""
    if not paths.run.exists():
        return
    for child in paths.run.iterdir():
        if child.name == "logs":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _node_ready(paths: Paths) -> bool:
    out = kubectl(
        paths,
        "get",
        "node",
        NODE,
        "-o",
        "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        check=False,
    )
    return out.strip() == "True"


def apply_addons(paths: Paths) -> None:
    text = (REPO / "scripts" / "lib" / "cluster-addons.yaml").read_text()
    (paths.run / "local-path").mkdir(exist_ok=True)
    for key, value in {
        "DNS_IP": DNS_IP,
        "COREDNS_IMAGE": COREDNS_IMAGE,
        "LOCAL_PATH_IMAGE": LOCAL_PATH_IMAGE,
        "BUSYBOX_IMAGE": BUSYBOX_IMAGE,
        "LOCAL_PATH_DIR": str(paths.run / "local-path"),
    }.items():
        text = text.replace(f"${{{key}}}", value)
    kubectl(paths, "apply", "--server-side", "-f", "-", input=text)


def down(paths: Paths, *, check_host: bool = True) -> list[str]:
    state = load_state(paths)
    pids: dict[str, int] = state.get("pids", {})  # type: ignore[assignment]
    for name in ("kubelet", "kube-proxy", "kube-router"):
        if name in pids:
            stop_pid(pids[name], name, 15)
    kill_cgroups()
    for name in (
        "containerd",
        "kube-scheduler",
        "kube-controller-manager",
        "kube-apiserver",
        "etcd",
    ):
        if name in pids:
            stop_pid(pids[name], name, 15)
    kill_namespace_members(paths)
    kill_cgroups()
    remove_namespaces(paths, state)
    host = state.get("host")
    differences: list[str] = []
    if isinstance(host, dict):
        for name, value in host["sysctls"].items():
            if value is not None and read_sysctl(name) != value:
                write_sysctl(name, value)
        differences = compare_records(host, host_record())
    still_mounted = [
        line
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if str(paths.run) in line
    ]
    if still_mounted:
        differences.append(f"still mounted: {still_mounted}")
    else:
        clear_run_folder(paths)
    for line in differences:
        log(f"host differs from before `up`: {line}")
    if differences and check_host:
        raise ClusterError("the host is not as it was before `up` (see above)")
    if not differences:
        log(
            "down: the host's sysctls, iptables rules, links, addresses, routes, mounts "
            "and cgroups are as before"
        )
    return differences


def status(paths: Paths) -> int:
    states = running(paths)
    for name, is_running in states.items():
        print(f"{name:24} {'running' if is_running else 'stopped'}")
    ready = all(states.values()) and _node_ready(paths)
    print(f"{'node ' + NODE:24} {'Ready' if ready else 'not ready'}")
    return 0 if ready else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("up", "down", "status", "kubectl", "exec"))
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    paths = Paths.from_env()
    try:
        if options.command == "up":
            up(paths)
        elif options.command == "down":
            down(paths)
        elif options.command == "status":
            return status(paths)
        else:
            args = list(options.args)
            if args and args[0] == "--":
                args = args[1:]
            if options.command == "kubectl":
                args = [str(paths.binary("kubectl")), f"--kubeconfig={paths.kubeconfig}", *args]
            env = {
                **os.environ,
                "KUBECONFIG": str(paths.kubeconfig),
                "PATH": f"{paths.bin}:{os.environ['PATH']}",
            }
            # nsenter starts in / of the mount namespace: keep the caller's folder.
            prefix = [*ns_prefix(paths)[:-1], f"--wd={os.getcwd()}", "--"]
            return subprocess.run([*prefix, *args], env=env, check=False).returncode
    except ClusterError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
