"""The README's table of environment variables, compose.yaml and the manifests under k8s/ agree,
and the table lists every variable the code reads.

The table (README, "Running the services as separate processes") is the one place a variable is
documented: its name, the processes that read it ("used by"), its default (or "required": a
deployment must set it; "required unless X": it or X) and its meaning. `<SERVICE>` in a name is
the reading service's own name in capitals, `<PEER>` any other service's. The tests hold the
rest of the repository to it, each failure naming the file, the process and the variable:

- the code: every variable the framework and the shop read (found by scanning their source for
  environment look-ups, the gateway profiles for `${VAR}` and the gateway's k8s wrapper script
  for `${VAR}`) is in the table, and every row is read by something, so neither the table nor
  the code can fall behind the other; a variable read in a service's package is listed for that
  service; a profile's `${VAR:-default}` default is the table's;
- compose.yaml and each rendered overlay (`kubectl kustomize`, so patches and generated Secrets
  count as the cluster will see them): every process of the shop is there, sets only variables
  the table lists for it, sets every required one, and sets no variable twice with two values;
  the processes of one deployment agree on the values they share (the JWT issuer, the brokers),
  and compose agrees with the dev overlay where both set a plain value;
- ports: the ports in the table are `example_shop.common.PORTS` and the profiles' defaults; in
  compose and k8s each service's MSA_HTTP_PORT is its container port, its Service's target, its
  scrape port, the port the gateway's `<PEER>_URL` names and the one its NetworkPolicies open;
  the gateway's GATEWAY_PORT and GATEWAY_ADMIN_PORT are its published and probed ports;
- the environments work: each service's `ServiceSettings.from_env` takes it, and the web
  gateway's profile loads with the gateway's compose and dev environment (with its dev-only
  files-signing key, which it refuses unless GATEWAY_DEVELOPMENT=true says development).
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from example_shop.common import PORTS
from framework.cli import RUN_ENVIRONMENT
from framework.gateway.config import load_config
from framework.service import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
COMPOSE = REPO / "compose.yaml"
K8S = REPO / "k8s"
PROFILES = sorted((REPO / "example_shop" / "gateway").glob("*.yaml"))
GATEWAY_SCRIPT = K8S / "base" / "gateway" / "run-gateway.sh"
SECTION = "**Running the services as separate processes.**"
HEADER = ["variable", "used by", "default", "meaning"]

SERVICES = tuple(PORTS)
GATEWAY = "gateway"
PROCESSES = (*SERVICES, GATEWAY)
MIGRATE = "msa migrate"
TOOLS = (MIGRATE, "msa shop", "msa shop --processes")
ALL_SERVICES = "all services"

OWN, PEER = "<SERVICE>", "<PEER>"
DEPLOYMENTS = ("compose.yaml", "k8s/overlays/dev", "k8s/overlays/prod")
DIFFERS_BY_DESIGN = {
    "STOREFRONT_ORIGIN": "the public origin: localhost:8000 under compose, the Ingress host in k8s"
}
"""Variables compose and the dev overlay may set to different values, and why."""

Doc = dict[str, Any]


# -- the README's table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    names: tuple[str, ...]
    users: frozenset[str]
    default: str
    meaning: str

    @property
    def required(self) -> bool:
        return self.default.startswith("required")

    @property
    def unless(self) -> str | None:
        """X of "required unless X": set instead, it satisfies the requirement."""
        found = re.match(r"required unless `([^`]+)`", self.default)
        return found.group(1) if found else None

    def reads(self, variable: str, user: str) -> bool:
        """Whether this row documents `variable` as read by `user`."""
        return user in self.users and any(
            _pattern(name, user).fullmatch(variable) for name in self.names
        )


def _pattern(name: str, user: str) -> re.Pattern[str]:
    """A documented name as a regex over concrete names, for the process `user`."""
    own = re.escape(user.upper()) if user in SERVICES else "(?!)"
    peers = "|".join(re.escape(s.upper()) for s in SERVICES if s != user)
    regex = re.escape(name).replace(re.escape(OWN), own).replace(re.escape(PEER), f"(?:{peers})")
    return re.compile(regex)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _users(cell: str, line: str) -> frozenset[str]:
    users: set[str] = set()
    for token in (t.strip().strip("`") for t in cell.split(",")):
        if token == ALL_SERVICES:
            users.update(SERVICES)
        elif token in PROCESSES or token in TOOLS:
            users.add(token)
        else:
            pytest.fail(f"README table: unknown process {token!r} in {line!r}", pytrace=False)
    return frozenset(users)


@functools.cache
def table() -> tuple[Row, ...]:
    """The README's variable table: the first table after the section's heading."""
    text = README.read_text()
    assert SECTION in text, f"README: no section {SECTION}"
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ")]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines, f"README: no table in the section {SECTION}"
    assert _cells(lines[0]) == HEADER, f"README: the table's header is not {HEADER}: {lines[0]}"
    rows = []
    for line in lines[2:]:
        cells = _cells(line)
        assert len(cells) == len(HEADER), f"README table: not {len(HEADER)} cells: {line}"
        names = tuple(name.strip().strip("`") for name in cells[0].split(","))
        rows.append(Row(names, _users(cells[1], line), cells[2], cells[3]))
    return tuple(rows)


def documented(variable: str, user: str) -> Row | None:
    return next((row for row in table() if row.reads(variable, user)), None)


def row_named(name: str) -> Row:
    found = [row for row in table() if name in row.names]
    assert len(found) == 1, f"README table: {len(found)} rows for {name}"
    return found[0]


def test_the_table_lists_each_variable_once() -> None:
    names = [name for row in table() for name in row.names]
    assert len(names) == len(set(names)), (
        f"listed twice: {sorted(n for n in names if names.count(n) > 1)}"
    )
    for name in names:
        assert re.fullmatch(r"(?:<SERVICE>_|<PEER>_)?[A-Z][A-Z0-9_]*", name), name


# -- what the code reads -----------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    variable: str  # an f-string's placeholders are "<*>"
    source: Path
    default: str | None = None


_LOOKUPS = (
    # env.get("X"), os.environ["X"], settings.env.setdefault(f"{name.upper()}_URL", ...)
    re.compile(r'\b(?:environ|env)\s*(?:\.(?:get|setdefault|pop)\s*\(|\[)\s*(f?"[^"]+")'),
    re.compile(r'\bgetenv\(\s*(f?"[^"]+")'),
    re.compile(r'(f?"[^"]+")\s+(?:not\s+)?in\s+[\w.]*env\b'),  # "X" in settings.env
)
_CONSTANTS = re.compile(r"^[A-Z_]*VARIABLES?\s*=\s*(.+)$", re.M)  # LEVEL_VARIABLE = "MSA_..."
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_VARIABLE = re.compile(r"(?:<\*>_)?[A-Z][A-Z0-9_]*")


def _normalized(literal: str) -> str:
    text = literal.removeprefix("f").strip('"')
    return re.sub(r"\{[^}]*\}", "<*>", text) if literal.startswith("f") else text


@functools.cache
def code_reads() -> tuple[Read, ...]:
    """Every environment variable the framework, the shop and the gateway's profiles read."""
    reads: list[Read] = []
    for root in (REPO / "framework", REPO / "example_shop"):
        for path in sorted(root.rglob("*.py")):
            source = path.read_text()
            literals = [m.group(1) for p in _LOOKUPS for m in p.finditer(source)]
            for constant in _CONSTANTS.finditer(source):
                literals += re.findall(r'"[^"]+"', constant.group(1))
            for literal in literals:
                variable = _normalized(literal)
                if _VARIABLE.fullmatch(variable):
                    reads.append(Read(variable, path))
    # What ServiceSettings and KafkaSettings read, as `msa run --help` lists it (a test in
    # tests/framework/test_cli.py holds that list to their code).
    service = REPO / "framework" / "service.py"
    reads += [Read(v, service) for v in re.findall(r"^  ([A-Z][A-Z0-9_]+) ", RUN_ENVIRONMENT, re.M)]
    for path in [*PROFILES, GATEWAY_SCRIPT]:
        for found in _PLACEHOLDER.finditer(path.read_text()):
            reads.append(Read(found.group(1), path, found.group(2)))
    return tuple(reads)


def _documents(read: Read, row: Row) -> bool:
    if "<*>" not in read.variable:
        return any(row.reads(read.variable, user) for user in row.users)
    return any(name.replace(OWN, "<*>").replace(PEER, "<*>") == read.variable for name in row.names)


def _readers(path: Path) -> set[str]:
    """The process(es) a source file is read by, when it belongs to exactly one."""
    relative = path.relative_to(REPO).parts
    if relative[0] == "example_shop" and relative[1] in SERVICES:
        return {relative[1]}
    if path in PROFILES or path == GATEWAY_SCRIPT:
        return {GATEWAY}
    return set()


def test_the_scan_finds_what_the_code_reads() -> None:
    """The scan itself works: a few reads of each kind it must see."""
    found = {read.variable for read in code_reads()}
    expected = {
        "MSA_HTTP_PORT",  # ServiceSettings (via msa run --help)
        "KAFKA_SASL_PASSWORD",  # KafkaSettings (via msa run --help)
        "MSA_LOG_FORMAT",  # a *_VARIABLE constant
        "<*>_DATABASE_URL",  # an f-string
        "SHIPPING_TICK_SECONDS",  # settings.env.get
        "POSTGRES_ADMIN_URL",  # os.environ.get in msa migrate
        "FILES_SIGNING_KEY",  # a gateway profile's ${...}
        "GATEWAY_CONFIG",  # the gateway's k8s wrapper script
    }
    assert expected <= found, f"the scan missed {sorted(expected - found)}"


def test_every_variable_the_code_reads_is_in_the_table() -> None:
    problems = []
    for read in code_reads():
        rows = [row for row in table() if _documents(read, row)]
        where = read.source.relative_to(REPO)
        if not rows:
            problems.append(f"{where} reads {read.variable}, which the README's table lacks")
        for reader in _readers(read.source):
            if not any(reader in row.users for row in rows):
                problems.append(
                    f"{where} reads {read.variable}, but the README's table does not list "
                    f"{reader} as using it"
                )
    assert not problems, "\n".join(sorted(set(problems)))


def test_every_variable_in_the_table_is_read_by_the_code() -> None:
    unread = [
        name
        for row in table()
        for name in row.names
        if not any(_documents(read, Row((name,), row.users, "", "")) for read in code_reads())
    ]
    assert not unread, f"the README's table lists variables nothing reads: {unread}"


def test_the_profiles_defaults_are_the_tables() -> None:
    problems = []
    for read in code_reads():
        if read.default is None:
            continue
        row = documented(read.variable, GATEWAY)
        assert row is not None, read
        if row == row_named(f"{PEER}_URL"):
            continue  # the ports test holds these to PORTS
        shown = "sha256:" if read.default.startswith("sha256:") else read.default
        if shown not in row.default:
            problems.append(
                f"{read.source.relative_to(REPO)}: {read.variable} defaults to "
                f"{read.default!r}, the README's table says {row.default!r}"
            )
    assert not problems, "\n".join(problems)


# -- what compose and k8s set ---------------------------------------------------------------------


@dataclass
class Process:
    """One container of the shop in one deployment, and the environment it is given."""

    deployment: str
    name: str  # a process of the shop: a service or the gateway
    workload: str  # the compose service, or the k8s kind/name
    env: dict[str, str | None] = field(default_factory=dict)  # None: a value from elsewhere
    job: bool = False  # a migration Job: `msa migrate` for the service
    conflicts: list[str] = field(default_factory=list)
    raw: Doc = field(default_factory=dict, repr=False)  # the compose service or pod template

    @property
    def users(self) -> tuple[str, ...]:
        return (self.name, MIGRATE) if self.job else (self.name,)

    def set(self, variable: str, value: str | None) -> None:
        if variable in self.env and self.env[variable] != value:
            self.conflicts.append(f"{variable}: {self.env[variable]!r}, then {value!r}")
        self.env[variable] = value

    def where(self) -> str:
        return f"{self.deployment}: {self.workload}"


def _compose() -> list[Process]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    processes = []
    for name in PROCESSES:
        assert name in services, f"compose.yaml: no service {name}"
        process = Process("compose.yaml", name, name, raw=services[name])
        environment = services[name].get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for variable, value in environment.items():
            process.set(variable, None if value is None else str(value))
        processes.append(process)
    return processes


class Rendered:
    """One overlay as `kubectl kustomize` renders it."""

    def __init__(self, overlay: str) -> None:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.fail("kubectl is not installed: it renders k8s/ (`kubectl kustomize`)")
        output = subprocess.run(
            [kubectl, "kustomize", str(REPO / overlay)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        self.name = overlay
        self.docs: list[Doc] = [d for d in yaml.safe_load_all(output) if d]

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> Doc | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def config(self, name: str) -> dict[str, str]:
        found = self.get("ConfigMap", name)
        assert found is not None, f"{self.name}: no ConfigMap {name}"
        return dict(found.get("data", {}))

    def secret(self, name: str) -> dict[str, str] | None:
        """A Secret's values; None for one the overlay expects to exist (prod)."""
        found = self.get("Secret", name)
        if found is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in found.get("data", {}).items()}
        data.update(found.get("stringData", {}))
        return data

    def value(self, source: Doc) -> str | None:
        if "value" in source:
            return str(source["value"])
        reference = source.get("valueFrom", {})
        if "configMapKeyRef" in reference:
            ref = reference["configMapKeyRef"]
            return self.config(ref["name"])[ref["key"]]
        if "secretKeyRef" in reference:
            ref = reference["secretKeyRef"]
            return (self.secret(ref["name"]) or {}).get(ref["key"])
        return None

    def processes(self) -> list[Process]:
        processes = []
        for kind in ("Deployment", "Job"):
            for doc in self.of_kind(kind):
                name = doc["metadata"]["name"]
                template = doc["spec"]["template"]
                component = template["metadata"]["labels"].get("app.kubernetes.io/component")
                if kind == "Job" and component == "migration":
                    process = Process(self.name, name.removesuffix("-migrate"), f"Job/{name}")
                    process.job = True
                elif kind == "Deployment" and name in PROCESSES:
                    process = Process(self.name, name, f"Deployment/{name}")
                else:
                    continue
                process.raw = template
                [container] = template["spec"]["containers"]
                for source in container.get("envFrom", []):
                    assert "configMapRef" in source, f"{process.where()}: envFrom {source}"
                    for variable, value in self.config(source["configMapRef"]["name"]).items():
                        process.set(variable, value)
                for variable in container.get("env", []):
                    process.set(variable["name"], self.value(variable))
                processes.append(process)
        return processes


@functools.cache
def rendered(overlay: str) -> Rendered:
    return Rendered(overlay)


@functools.cache
def deployed(deployment: str) -> tuple[Process, ...]:
    if deployment == "compose.yaml":
        return tuple(_compose())
    return tuple(rendered(deployment).processes())


@pytest.fixture(params=DEPLOYMENTS)
def deployment(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _running(deployment: str) -> Iterator[Process]:
    """The long-running processes (not the migration Jobs)."""
    return (p for p in deployed(deployment) if not p.job)


def test_every_process_of_the_shop_is_deployed(deployment: str) -> None:
    names = sorted(p.name for p in _running(deployment))
    assert names == sorted(PROCESSES), f"{deployment}: runs {names}, not {sorted(PROCESSES)}"


def test_every_variable_set_is_in_the_table_for_its_process(deployment: str) -> None:
    problems = []
    for process in deployed(deployment):
        for variable in process.env:
            if not any(documented(variable, user) for user in process.users):
                problems.append(
                    f"{process.where()} sets {variable}, which the README's table does not "
                    f"list for {' or '.join(process.users)}"
                )
    assert not problems, "\n".join(problems)


def test_every_required_variable_is_set(deployment: str) -> None:
    problems = []
    for process in _running(deployment):
        for row in table():
            if not row.required or process.name not in row.users:
                continue
            for name in row.names:
                if any(_pattern(name, process.name).fullmatch(v) for v in process.env):
                    continue
                instead = row.unless
                if instead and any(
                    _pattern(instead, process.name).fullmatch(v) for v in process.env
                ):
                    continue
                unless = f" (or {instead})" if instead else ""
                problems.append(
                    f"{process.where()} does not set {name}{unless}, which the README's "
                    f"table marks {row.default!r}"
                )
    assert not problems, "\n".join(problems)


def test_no_variable_is_set_twice_with_two_values(deployment: str) -> None:
    problems = [
        f"{process.where()} sets {conflict}"
        for process in deployed(deployment)
        for conflict in process.conflicts
    ]
    assert not problems, "\n".join(problems)


def test_the_processes_of_a_deployment_agree_on_what_they_share(deployment: str) -> None:
    values: dict[str, dict[str | None, list[str]]] = {}
    for process in _running(deployment):
        for variable, value in process.env.items():
            if value is not None:
                values.setdefault(variable, {}).setdefault(value, []).append(process.name)
    problems = [
        f"{deployment}: {variable} differs: "
        + "; ".join(f"{value!r} in {', '.join(names)}" for value, names in seen.items())
        for variable, seen in values.items()
        if len(seen) > 1
    ]
    assert not problems, "\n".join(problems)


def test_compose_and_the_dev_overlay_set_the_same_values() -> None:
    k8s = {p.name: p for p in _running("k8s/overlays/dev")}
    problems = []
    for process in _running("compose.yaml"):
        for variable, value in process.env.items():
            other = k8s[process.name].env.get(variable)
            if variable in DIFFERS_BY_DESIGN or value is None or other is None:
                continue
            if value != other:
                problems.append(
                    f"{process.name}: {variable} is {value!r} in compose.yaml, "
                    f"{other!r} in k8s/overlays/dev"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("deployment", ["compose.yaml", "k8s/overlays/dev"])
def test_the_environments_work(deployment: str) -> None:
    """The services' settings parse, and the web gateway's profile loads (the dev-only
    files-signing key is refused unless GATEWAY_DEVELOPMENT=true)."""
    for process in _running(deployment):
        env = {k: v for k, v in process.env.items() if v is not None}
        if process.name == GATEWAY:
            web = REPO / "example_shop" / "gateway" / "web.yaml"
            load_config(web, env=env)  # GatewayConfigError names each problem
        else:
            ServiceSettings.from_env(env)


# -- ports --------------------------------------------------------------------------------------


def _port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    assert parts.hostname is not None, url
    assert parts.port is not None, url
    return parts.hostname, parts.port


def test_the_tables_ports_are_the_shops_and_the_profiles() -> None:
    listed = {
        k: int(v) for k, v in re.findall(r"(\w+) (\d{4})", row_named("MSA_HTTP_PORT").default)
    }
    assert listed == PORTS, (
        f"the README's table gives MSA_HTTP_PORT the defaults {listed}, the shop's are "
        f"{PORTS} (example_shop.common.PORTS)"
    )
    problems = []
    for read in code_reads():
        if read.default is None or not read.variable.endswith("_URL"):
            continue
        peer = read.variable.removesuffix("_URL").lower()
        if peer in PORTS and _port(read.default) != ("127.0.0.1", PORTS[peer]):
            problems.append(
                f"{read.source.name}: {read.variable} defaults to {read.default}, "
                f"not port {PORTS[peer]}"
            )
    assert not problems, "\n".join(problems)


def _peer_urls(gateway: Process) -> dict[str, tuple[str, int]]:
    urls = {}
    for variable, value in gateway.env.items():
        peer = variable.removesuffix("_URL").lower()
        if variable.endswith("_URL") and peer in SERVICES and value is not None:
            urls[peer] = _port(value)
    assert urls, f"{gateway.where()}: no <PEER>_URL"
    return urls


def _int(process: Process, variable: str) -> int:
    value = process.env.get(variable)
    assert value is not None, f"{process.where()}: no {variable}"
    return int(value)


def test_compose_ports_agree() -> None:
    processes = {p.name: p for p in _running("compose.yaml")}
    gateway = processes.pop(GATEWAY)
    problems = []
    for peer, (host, port) in _peer_urls(gateway).items():
        wanted = (peer, _int(processes[peer], "MSA_HTTP_PORT"))
        if (host, port) != wanted:
            problems.append(f"gateway: {peer.upper()}_URL is {host}:{port}, {peer} is {wanted}")
    published = {int(p.rpartition(":")[2]) for p in gateway.raw.get("ports", [])}
    if published != {_int(gateway, "GATEWAY_PORT")}:
        problems.append(
            f"gateway publishes {published}, GATEWAY_PORT is {gateway.env['GATEWAY_PORT']}"
        )
    probe = " ".join(gateway.raw["healthcheck"]["test"])
    if f"127.0.0.1:{_int(gateway, 'GATEWAY_ADMIN_PORT')}/" not in probe:
        problems.append(f"gateway's healthcheck probes {probe!r}, not GATEWAY_ADMIN_PORT")
    for process in processes.values():  # the image's HEALTHCHECK reads MSA_HTTP_PORT
        if "healthcheck" in process.raw:
            problems.append(f"{process.name}: a healthcheck of its own")
    assert not problems, "\n".join(problems)


def _container_ports(template: Doc, container: str) -> dict[str, int]:
    [found] = [c for c in template["spec"]["containers"] if c["name"] == container]
    return {p["name"]: p["containerPort"] for p in found.get("ports", [])}


def _flow_ports(k8s: Rendered, source: str, destination: str) -> set[int]:
    """The ports the NetworkPolicies open from `source` to `destination` (components), in
    both halves of the flow: the egress at its source and the ingress at its destination.
    Where the two halves disagree, the set holds both (and so never equals one port)."""

    def opened(direction: str, own: str, other: str) -> set[int]:
        peer_key = "from" if direction == "ingress" else "to"
        ports: set[int] = set()
        for policy in k8s.of_kind("NetworkPolicy"):
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            if selector.get("app.kubernetes.io/name") != own:
                continue
            for rule in policy["spec"].get(direction, []):
                peers = {
                    p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                    for p in rule.get(peer_key, [])
                }
                if other in peers:
                    ports |= {p["port"] for p in rule["ports"]}
        return ports

    egress, ingress = opened("egress", source, destination), opened("ingress", destination, source)
    return egress | ingress if egress and ingress else {-1}  # -1: a half is missing


def _ingress_from_outside(k8s: Rendered, component: str) -> set[int]:
    """The ports the NetworkPolicies open into `component` from outside the namespace."""
    ports: set[int] = set()
    for policy in k8s.of_kind("NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if selector.get("app.kubernetes.io/name") == component:
            for rule in policy["spec"].get("ingress", []):
                if any("namespaceSelector" in peer for peer in rule.get("from", [])):
                    ports |= {p["port"] for p in rule["ports"]}
    return ports


@pytest.mark.parametrize("overlay", ["k8s/overlays/dev", "k8s/overlays/prod"])
def test_k8s_ports_agree(overlay: str) -> None:
    k8s = rendered(overlay)
    processes = {p.name: p for p in _running(overlay)}
    gateway = processes.pop(GATEWAY)
    urls = _peer_urls(gateway)
    problems = []
    for name, process in processes.items():
        port = _int(process, "MSA_HTTP_PORT")
        if _container_ports(process.raw, "app").get("http") != port:
            problems.append(f"{name}: container port http is not MSA_HTTP_PORT {port}")
        scraped = process.raw["metadata"].get("annotations", {}).get("prometheus.io/port")
        if scraped != str(port):
            problems.append(f"{name}: prometheus.io/port {scraped}, MSA_HTTP_PORT {port}")
        service = k8s.get("Service", name)
        assert service is not None, f"{overlay}: no Service {name}"
        [exposed] = [p for p in service["spec"]["ports"] if p["targetPort"] == "http"]
        if name in urls and urls[name] != (name, exposed["port"]):
            problems.append(
                f"gateway: {name.upper()}_URL is {urls[name]}, Service {name} is "
                f"port {exposed['port']}"
            )
        if name in urls and _flow_ports(k8s, GATEWAY, name) != {port}:
            problems.append(
                f"gateway -> {name}: the NetworkPolicies open {_flow_ports(k8s, GATEWAY, name)}"
                f" (-1: one half of the flow is missing), MSA_HTTP_PORT is {port}"
            )
    ports = _container_ports(gateway.raw, "gateway")
    for variable, name in (("GATEWAY_PORT", "http"), ("GATEWAY_ADMIN_PORT", "admin")):
        if ports.get(name) != _int(gateway, variable):
            problems.append(f"gateway: container port {name} {ports.get(name)} is not {variable}")
    if _ingress_from_outside(k8s, GATEWAY) != {_int(gateway, "GATEWAY_PORT")}:
        problems.append(
            f"ingress controller -> gateway: the NetworkPolicies open "
            f"{_ingress_from_outside(k8s, GATEWAY)}, not GATEWAY_PORT"
        )
    kafka_host, kafka_port = _port(gateway.env["KAFKA_BOOTSTRAP"] or "")
    for process in [gateway, *processes.values()]:
        if _flow_ports(k8s, process.name, kafka_host) != {kafka_port}:
            problems.append(
                f"{process.name} -> {kafka_host}: the NetworkPolicies open "
                f"{_flow_ports(k8s, process.name, kafka_host)}, KAFKA_BOOTSTRAP's port is "
                f"{kafka_port}"
            )
    assert not problems, "\n".join(problems)


def test_the_dev_databases_are_where_the_network_policies_let_services_go() -> None:
    k8s = rendered("k8s/overlays/dev")
    problems = []
    for process in deployed("k8s/overlays/dev"):
        for variable, value in process.env.items():
            if value is None or not variable.endswith(("_DATABASE_URL", "_MONGO_URL")):
                continue
            host, port = _port(value)
            component = process.workload.partition("/")[2]
            if _flow_ports(k8s, component, host) != {port}:
                problems.append(
                    f"{process.where()}: {variable} names {host}:{port}, the NetworkPolicies "
                    f"open {_flow_ports(k8s, component, host)} (-1: one half is missing)"
                )
    assert not problems, "\n".join(problems)
