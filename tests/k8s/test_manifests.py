"""Rules for the Kubernetes manifests (k8s/) that kubernetes-validate and checkov do not check.

Each overlay is rendered once per session with `kubectl kustomize` and parsed with PyYAML. The
rules: every Deployment has probes and a PodDisruptionBudget, every HPA's target exists, every
Service selects a Pod, the NetworkPolicies allow exactly the shop's real flows (derived from
the web gateway's config and the services' databases, not listed by hand), images are pinned,
every container runs locked down, termination outlasts the drain, prod has three Kafka brokers
and a database server per owning service, and local differs from dev only in what its one-node
cluster needs. The last test runs scripts/validate-k8s itself.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from example_shop.contracts import TOPICS
from example_shop.shop import MONGO_SERVICES, POSTGRES_SERVICES, START_ORDER
from framework.gateway.app import Gateway

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod", "local")
SHOP_IMAGES = ("msa-framework/shop", "msa.local/shop")  # local: preloaded under this name
SHOP_UID = 10001
NAME = "app.kubernetes.io/name"
POD_KINDS = ("Deployment", "StatefulSet", "Job")

# Peers outside the namespace, as the policies name them.
KUBE_DNS = "kube-dns"
INGRESS_CONTROLLER = "ingress-controller"
NODE = "node"
EXTERNAL_PEERS = {
    ("kube-system", (("k8s-app", "kube-dns"),)): KUBE_DNS,
    ("ingress-nginx", ((NAME, "ingress-nginx"),)): INGRESS_CONTROLLER,
}
# local: the node's address and the pod network (where kube-proxy's SNAT puts the node's
# clients), the only ipBlocks any policy may name.
NODE_CIDRS = frozenset({"10.97.0.1/32", "10.244.0.0/16"})

Doc = dict[str, Any]


# -- rendering -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodTemplate:
    kind: str
    name: str
    labels: dict[str, str]
    spec: Doc

    @property
    def component(self) -> str:
        return self.labels[NAME]

    def containers(self) -> Iterator[Doc]:
        """Every container, init containers (and native sidecars) included."""
        yield from self.spec.get("initContainers", [])
        yield from self.spec["containers"]


class Manifests:
    """One overlay's rendered objects."""

    def __init__(self, overlay: str, docs: list[Doc]) -> None:
        self.overlay = overlay
        self.docs = docs

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> Doc:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert found, f"{self.overlay}: no {kind} {name}"
        return found[0]

    def find(self, kind: str, prefix: str) -> Doc:
        """A generated object (ConfigMap, Secret) by its name without kustomize's hash suffix."""
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"].startswith(prefix + "-")]
        found += [d for d in self.of_kind(kind) if d["metadata"]["name"] == prefix]
        assert found, f"{self.overlay}: no {kind} {prefix}"
        return found[0]

    def pod_templates(self) -> list[PodTemplate]:
        return [
            PodTemplate(
                d["kind"],
                d["metadata"]["name"],
                d["spec"]["template"]["metadata"]["labels"],
                d["spec"]["template"]["spec"],
            )
            for kind in POD_KINDS
            for d in self.of_kind(kind)
        ]

    def template(self, kind: str, name: str) -> PodTemplate:
        return next(t for t in self.pod_templates() if (t.kind, t.name) == (kind, name))

    def components(self) -> set[str]:
        return {t.component for t in self.pod_templates()}

    def config(self, name: str) -> dict[str, str]:
        data: dict[str, str] = self.find("ConfigMap", name)["data"]
        return data


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        message = "kubectl is not installed (it renders k8s/ with `kubectl kustomize`)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return kubectl


@pytest.fixture(scope="session")
def rendered() -> dict[str, Manifests]:
    kubectl = _kubectl()
    result = {}
    for overlay in OVERLAYS:
        output = subprocess.run(
            [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        result[overlay] = Manifests(overlay, [d for d in yaml.safe_load_all(output) if d])
    return result


@pytest.fixture(params=OVERLAYS)
def manifests(request: pytest.FixtureRequest, rendered: dict[str, Manifests]) -> Manifests:
    return rendered[request.param]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only, as ours are) selects `labels`."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    match: dict[str, str] = selector.get("matchLabels", {})
    return bool(match) and match.items() <= labels.items()


def env_of(manifests: Manifests, container: Doc) -> dict[str, str]:
    """A container's plain environment: its ConfigMaps (envFrom), then its own `value`s."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(manifests.config(source["configMapRef"]["name"]))
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
    return env


# -- Deployments -----------------------------------------------------------------------------------


def test_every_deployment_has_a_pdb_selecting_it(manifests: Manifests) -> None:
    budgets = manifests.of_kind("PodDisruptionBudget")
    for deployment in manifests.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert len(covering) == 1, (
            f"{manifests.overlay}: Deployment {deployment['metadata']['name']}"
        )


def test_every_deployment_has_startup_readiness_and_liveness_probes(manifests: Manifests) -> None:
    for template in manifests.pod_templates():
        if template.kind != "Deployment":
            continue
        for container in template.containers():
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{template.name}/{container['name']}: no {probe}"


def test_services_probe_alive_and_ready(manifests: Manifests) -> None:
    """Liveness on /alive (no dependency checks: a slow database restarts nothing), readiness
    on /ready (false while starting and from SIGTERM on, see framework.service)."""
    services = [t for t in manifests.pod_templates() if t.kind == "Deployment"]
    services = [t for t in services if t.labels.get("app.kubernetes.io/component") == "service"]
    assert {t.name for t in services} == set(START_ORDER)
    for template in services:
        (container,) = template.spec["containers"]
        assert container["startupProbe"]["httpGet"]["path"] == "/alive"
        assert container["livenessProbe"]["httpGet"]["path"] == "/alive"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_rolling_updates_never_go_below_the_wanted_replicas(manifests: Manifests) -> None:
    for deployment in manifests.of_kind("Deployment"):
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_termination_grace_outlasts_prestop_and_drain(manifests: Manifests) -> None:
    """The kubelet must never SIGKILL a draining process: grace > preStop sleep + drain."""
    gateway_drain = inspect.signature(Gateway).parameters["drain_timeout"].default
    for template in manifests.pod_templates():
        if template.kind != "Deployment":
            continue
        for container in template.spec["containers"]:
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "sleep", command
            if template.component == "gateway":
                drain = float(gateway_drain)
            else:
                drain = float(env_of(manifests, container)["MSA_SHUTDOWN_GRACE"])
            grace = template.spec["terminationGracePeriodSeconds"]
            assert grace > float(command[1]) + drain, template.name


# -- HPAs, Services, Secrets ----------------------------------------------------------------------


def test_every_deployment_leaves_its_replicas_to_one_owner(manifests: Manifests) -> None:
    """Its HPA, or where nothing measures CPU (local: no metrics-server), its own `replicas`;
    never both, or each `kubectl apply` would undo what the HPA chose."""
    hpas = manifests.of_kind("HorizontalPodAutoscaler")
    deployments = {d["metadata"]["name"]: d for d in manifests.of_kind("Deployment")}
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in hpas}
    assert targets == (set() if manifests.overlay == "local" else deployments.keys())
    for hpa in hpas:
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        deployment = manifests.get(target["kind"], target["name"])
        assert "replicas" not in deployment["spec"], f"HPA {target['name']} owns replicas"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for name, deployment in deployments.items():
        if name not in targets:
            assert deployment["spec"]["replicas"] >= 1, name


def test_prod_runs_at_least_two_replicas_of_everything(rendered: dict[str, Manifests]) -> None:
    for hpa in rendered["prod"].of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] >= 2, hpa["metadata"]["name"]


def test_every_service_selects_a_pod_template_and_its_ports(manifests: Manifests) -> None:
    for service in manifests.of_kind("Service"):
        name = service["metadata"]["name"]
        templates = [
            t
            for t in manifests.pod_templates()
            if selects({"matchLabels": service["spec"]["selector"]}, t.labels)
        ]
        assert templates, f"{manifests.overlay}: Service {name} selects no Pod"
        ports = {p["name"] for t in templates for c in t.containers() for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: no container port {port}"


def test_statefulsets_have_a_headless_service_and_volume_claims(manifests: Manifests) -> None:
    for statefulset in manifests.of_kind("StatefulSet"):
        headless = manifests.get("Service", statefulset["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        assert statefulset["spec"]["volumeClaimTemplates"], statefulset["metadata"]["name"]


def test_credentials_come_only_from_secrets(manifests: Manifests) -> None:
    secret_words = ("PASSWORD", "DATABASE_URL", "MONGO_URL", "KEY", "TOKEN", "SECRET")
    for template in manifests.pod_templates():
        for container in template.containers():
            for variable in container.get("env", []):
                if any(word in variable["name"] for word in secret_words):
                    assert "secretKeyRef" in variable.get("valueFrom", {}), (
                        f"{template.name}/{container['name']}: {variable['name']}"
                    )
    for config_map in manifests.of_kind("ConfigMap"):
        for key in config_map.get("data", {}):
            assert not any(word in key for word in secret_words), key


def test_prod_defines_no_secrets(rendered: dict[str, Manifests]) -> None:
    """Prod references Secrets that must exist (k8s/overlays/prod/README.md), never values."""
    assert rendered["prod"].of_kind("Secret") == []
    readme = (K8S / "overlays" / "prod" / "README.md").read_text()
    referenced = {
        ref["name"]
        for template in rendered["prod"].pod_templates()
        for container in template.containers()
        for variable in container.get("env", [])
        if (ref := variable.get("valueFrom", {}).get("secretKeyRef"))
    }
    for name in referenced:
        generic = name
        for service in (*POSTGRES_SERVICES, *MONGO_SERVICES):
            generic = generic.replace(f"-{service}-admin", "-<service>-admin")
        assert f"`{name}`" in readme or f"`{generic}`" in readme, f"README: Secret {name}"


# -- security --------------------------------------------------------------------------------------


def test_every_pod_and_container_runs_locked_down(manifests: Manifests) -> None:
    for template in manifests.pod_templates():
        where = f"{manifests.overlay}: {template.kind} {template.name}"
        pod = template.spec
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["enableServiceLinks"] is False, where
        assert pod["serviceAccountName"] == template.component, where
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert context["runAsUser"] == SHOP_UID, where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in template.containers():
            c = container["securityContext"]
            what = f"{where}/{container['name']}"
            assert c["runAsNonRoot"] is True, what
            assert c["runAsUser"] == SHOP_UID, what
            assert c["readOnlyRootFilesystem"] is True, what
            assert c["allowPrivilegeEscalation"] is False, what
            assert c["capabilities"] == {"drop": ["ALL"]}, what
            assert c["seccompProfile"] == {"type": "RuntimeDefault"}, what
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), what
            assert {"cpu", "memory"} <= resources["limits"].keys(), what
            if container["image"].startswith(SHOP_IMAGES):
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert "/tmp" in mounts, f"{what}: read-only root needs a writable /tmp"


def test_every_service_account_mounts_no_token(manifests: Manifests) -> None:
    accounts = manifests.of_kind("ServiceAccount")
    assert {a["metadata"]["name"] for a in accounts} == manifests.components()
    for account in accounts:
        assert account["automountServiceAccountToken"] is False


def test_every_image_is_pinned(manifests: Manifests) -> None:
    for template in manifests.pod_templates():
        for container in template.containers():
            image = container["image"]
            if "@sha256:" in image:
                continue
            repository, _, tag = image.rpartition(":")
            assert repository, f"{template.name}: {image} has no tag"
            assert "/" not in tag, f"{template.name}: {image} has no tag"
            assert tag != "latest", f"{template.name}: {image}"
            if repository in SHOP_IMAGES:
                assert tag == "0.1.0", image


def test_the_gateway_pod_has_two_containers_sharing_a_volume(manifests: Manifests) -> None:
    template = manifests.template("Deployment", "gateway")
    containers = list(template.containers())
    assert len(containers) == 2
    (sidecar,) = template.spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar: stops after the gateway"
    shared = set.intersection(*({m["name"] for m in c["volumeMounts"]} for c in containers))
    volumes = {v["name"]: v for v in template.spec["volumes"]}
    assert any("emptyDir" in volumes[name] for name in shared)


# -- network policies ------------------------------------------------------------------------------


def expected_flows(manifests: Manifests) -> set[tuple[str, str]]:
    """The shop's real flows, derived from what the code and configs declare."""
    web = yaml.safe_load((REPO / "example_shop" / "gateway" / "web.yaml").read_text())
    flows = {(INGRESS_CONTROLLER, "gateway")}
    if manifests.overlay == "local":  # no ingress controller: clients on the node
        flows.add((NODE, "gateway"))
    flows |= {("gateway", upstream) for upstream in web["upstreams"]}
    if "bus" in web:
        flows.add(("gateway", "kafka"))
    flows |= {(service, "kafka") for service in START_ORDER}
    flows |= {("kafka-topics", "kafka"), ("kafka", "kafka")}
    shared = manifests.overlay != "prod"  # dev and local: one server per engine
    for service in POSTGRES_SERVICES:
        server = "postgres" if shared else f"postgres-{service}"
        flows |= {(service, server), (f"{service}-migrate", server)}
    for service in MONGO_SERVICES:
        flows.add((service, "mongo" if shared else f"mongo-{service}"))
    flows |= {(component, KUBE_DNS) for component in manifests.components()}
    return flows


def _peers(manifests: Manifests, peer: Doc) -> set[str]:
    if "ipBlock" in peer:
        assert set(peer) == {"ipBlock"}, peer
        assert peer["ipBlock"]["cidr"] in NODE_CIDRS, f"an address we cannot name: {peer}"
        assert "except" not in peer["ipBlock"], peer
        return {NODE}
    if "namespaceSelector" in peer:
        namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        pods = tuple(sorted(peer["podSelector"]["matchLabels"].items()))
        return {EXTERNAL_PEERS[(namespace, pods)]}
    assert set(peer) == {"podSelector"}, f"a peer we cannot name: {peer}"
    return _selected(manifests, peer["podSelector"])


def _selected(manifests: Manifests, selector: Doc) -> set[str]:
    if selector == {}:
        return manifests.components()
    assert selector["matchLabels"].keys() == {NAME}, selector
    return {selector["matchLabels"][NAME]}


def allowed_flows(manifests: Manifests, direction: str) -> set[tuple[str, str]]:
    """(from, to) pairs the policies allow in `direction` ("ingress" or "egress")."""
    peer_key = "from" if direction == "ingress" else "to"
    flows: set[tuple[str, str]] = set()
    for policy in manifests.of_kind("NetworkPolicy"):
        selected = _selected(manifests, policy["spec"]["podSelector"])
        for rule in policy["spec"].get(direction, []):
            name = policy["metadata"]["name"]
            assert rule.get(peer_key), f"{name}: a rule open to everyone"
            assert rule.get("ports"), f"{name}: a rule open on every port"
            for peer in rule[peer_key]:
                for other in _peers(manifests, peer):
                    pairs = {
                        (other, own) if direction == "ingress" else (own, other) for own in selected
                    }
                    flows |= pairs
    return flows


def test_everything_is_denied_by_default(manifests: Manifests) -> None:
    deny = manifests.get("NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_network_policies_allow_exactly_the_real_flows(manifests: Manifests) -> None:
    expected = expected_flows(manifests)
    components = manifests.components()
    unknown = (
        {c for flow in expected for c in flow} - components - {KUBE_DNS, INGRESS_CONTROLLER, NODE}
    )
    assert not unknown, f"flows to components that do not exist: {unknown}"
    egress, ingress = allowed_flows(manifests, "egress"), allowed_flows(manifests, "ingress")
    want_egress = {f for f in expected if f[0] in components}
    want_ingress = {f for f in expected if f[1] in components}
    assert egress - want_egress == set(), "egress allowed beyond the real flows"
    assert want_egress - egress == set(), "real flows without an egress allow"
    assert ingress - want_ingress == set(), "ingress allowed beyond the real flows"
    assert want_ingress - ingress == set(), "real flows without an ingress allow"


# -- Kafka and the databases -----------------------------------------------------------------------


def test_the_kafka_quorum_matches_the_statefulset(manifests: Manifests) -> None:
    kafka = manifests.get("StatefulSet", "kafka")
    assert int(manifests.config("kafka-config")["BROKERS"]) == kafka["spec"]["replicas"]
    assert kafka["spec"]["podManagementPolicy"] == "Parallel"
    assert manifests.get("Service", "kafka-headless")["spec"]["publishNotReadyAddresses"] is True


def test_prod_has_three_kafka_brokers_with_replicated_topics(
    rendered: dict[str, Manifests],
) -> None:
    prod = rendered["prod"]
    assert prod.get("StatefulSet", "kafka")["spec"]["replicas"] == 3
    config = prod.config("kafka-config")
    assert (config["REPLICATION_FACTOR"], config["MIN_INSYNC_REPLICAS"]) == ("3", "2")


def test_the_topic_job_creates_every_shop_topic_and_its_dead_letters() -> None:
    lines = (K8S / "base" / "kafka" / "topics.txt").read_text().splitlines()
    entries = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    listed = {entry[0] for entry in entries}
    topics = {value for name, value in vars(TOPICS).items() if name.isupper()}
    assert listed == topics | {f"{topic}.dlq" for topic in topics}
    # The read models' sources keep the latest event per product for as long as the topic lives.
    compacted = {entry[0] for entry in entries if "cleanup.policy=compact" in entry[1:]}
    assert compacted == {TOPICS.CATALOG_EVENTS, TOPICS.STOCK_EVENTS}


def _server_databases(manifests: Manifests, name: str) -> set[str]:
    (container,) = manifests.template("StatefulSet", name).spec["containers"]
    return set(env_of(manifests, container)["SHOP_DATABASES"].split())


def test_prod_gives_each_owning_service_its_own_database_server(
    rendered: dict[str, Manifests],
) -> None:
    prod = rendered["prod"]
    servers = {s["metadata"]["name"] for s in prod.of_kind("StatefulSet")} - {"kafka"}
    assert servers == {f"postgres-{s}" for s in POSTGRES_SERVICES} | {
        f"mongo-{s}" for s in MONGO_SERVICES
    }
    for service in POSTGRES_SERVICES:
        assert _server_databases(prod, f"postgres-{service}") == {service}
        image = prod.template("StatefulSet", f"postgres-{service}").spec["containers"][0]["image"]
        assert image.startswith("postgres:")
    for service in MONGO_SERVICES:
        assert _server_databases(prod, f"mongo-{service}") == {service}


def test_dev_shares_one_server_per_engine_with_a_database_per_service(
    rendered: dict[str, Manifests],
) -> None:
    import base64

    dev = rendered["dev"]
    assert _server_databases(dev, "postgres") == set(POSTGRES_SERVICES)
    assert _server_databases(dev, "mongo") == set(MONGO_SERVICES)
    for service in (*POSTGRES_SERVICES, *MONGO_SERVICES):
        secret = dev.find("Secret", f"{service}-db")["data"]
        url = base64.b64decode(secret["url"]).decode()
        password = base64.b64decode(secret["password"]).decode()
        server = "postgres:5432" if service in POSTGRES_SERVICES else "mongo:27017"
        assert f"{service}:{password}@{server}/shop_{service}" in url
        assert password.startswith("dev-only-")


def test_each_postgres_service_has_a_migration_job(manifests: Manifests) -> None:
    for service in POSTGRES_SERVICES:
        job = manifests.template("Job", f"{service}-migrate")
        (container,) = job.spec["containers"]
        assert container["args"][0] == "migrate"
        assert container["args"][1].startswith(f"example_shop.{service}:")
        assert env_of(manifests, container)["MSA_TRANSPORT"] == "memory"


# -- local: dev on the one-node cluster -----------------------------------------------------------

# dev's image -> the name it is preloaded under on the local cluster (mongo: FerretDB instead).
LOCAL_IMAGES = {
    "msa-framework/shop:0.1.0": "msa.local/shop:0.1.0",
    "apache/kafka:4.0.0": "msa.local/kafka:4.3.0",
    "postgres:16.6-bookworm": "msa.local/postgres:15-bookworm",
    "busybox:1.36.1": "msa.local/busybox:1.36.1",
    "mongo:7.0.14": "msa.local/ferretdb:1.24.0",
}
# What local's Pods may request at most, all at once: the running Pods, the setup Jobs and a
# rolling update's surge Pod of each Deployment rolled under load. Its node has 2 CPUs (about
# 1.6 left beside the control plane) and 20 GiB, shared with the control plane: stay well below.
LOCAL_CPU_BUDGET_MILLI = 800
LOCAL_MEMORY_BUDGET_MI = 8 * 1024
LOCAL_ROLLED = ("orders", "inventory")  # two replicas each: one serves while the other goes


def _generated_names(*overlays: Manifests) -> dict[str, str]:
    """Generated ConfigMaps' and Secrets' names -> their names without kustomize's hash."""
    names = {}
    for manifests in overlays:
        for doc in (*manifests.of_kind("ConfigMap"), *manifests.of_kind("Secret")):
            name = doc["metadata"]["name"]
            if re.fullmatch(r".+-[2-9bcdfghkmt]{10}", name):
                names[name] = name.rsplit("-", 1)[0]
    return names


def _comparable(doc: Doc, generated: dict[str, str]) -> Doc:
    """`doc` without what local may change: hash suffixes, pull policies, images (mapped back
    to dev's), CPU requests and replicas."""
    text = yaml.safe_dump(doc)
    for name, plain in generated.items():
        text = text.replace(name, plain)
    doc = yaml.safe_load(text)
    doc["spec"] = doc.get("spec", {})
    doc["spec"].pop("replicas", None)
    pod = doc["spec"].get("template", {}).get("spec", {})
    dev_image = {local: dev for dev, local in LOCAL_IMAGES.items()}
    for container in (*pod.get("initContainers", []), *pod.get("containers", [])):
        container.pop("imagePullPolicy")
        container["image"] = dev_image.get(container["image"], container["image"])
        container["resources"]["requests"].pop("cpu")
    return doc


def _key(doc: Doc, generated: dict[str, str]) -> tuple[str, str]:
    name = doc["metadata"]["name"]
    return doc["kind"], generated.get(name, name)


def test_local_differs_from_dev_only_in_what_its_cluster_needs(
    rendered: dict[str, Manifests],
) -> None:
    """Everything of dev, the same, but: images and pull policy, CPU requests, replicas
    instead of HPAs, FerretDB in the mongo StatefulSet (and the Secrets its clients log in
    with), and the way in (NodePort, its NetworkPolicy). Storage is dev's: claims naming no
    StorageClass get the cluster's default (local-path)."""
    dev, local = rendered["dev"], rendered["local"]
    generated = _generated_names(dev, local)
    dev_docs = {_key(d, generated): d for d in dev.docs}
    local_docs = {_key(d, generated): d for d in local.docs}
    dropped = {k for k in dev_docs if k[0] == "HorizontalPodAutoscaler"}
    dropped.add(("ConfigMap", "mongo-init"))
    added = {("Service", "gateway-nodeport"), ("NetworkPolicy", "node-to-gateway-ingress")}
    assert local_docs.keys() == (dev_docs.keys() - dropped) | added
    changed = {("StatefulSet", "mongo"), ("Secret", "catalog-db"), ("Secret", "shipping-db")}
    for key in dev_docs.keys() - dropped - changed:
        assert _comparable(local_docs[key], generated) == _comparable(dev_docs[key], generated), key
    # The mongo StatefulSet: only its container and volumes differ (test_local_runs_ferretdb).
    dev_mongo, local_mongo = (
        _comparable(docs[("StatefulSet", "mongo")], generated) for docs in (dev_docs, local_docs)
    )
    for mongo in (dev_mongo, local_mongo):
        del mongo["spec"]["template"]["spec"]["containers"]
        del mongo["spec"]["template"]["spec"]["volumes"]
    assert local_mongo == dev_mongo
    for statefulset in local.of_kind("StatefulSet"):
        for claim in statefulset["spec"]["volumeClaimTemplates"]:
            assert "storageClassName" not in claim["spec"], statefulset["metadata"]["name"]


def test_local_pulls_no_image(rendered: dict[str, Manifests]) -> None:
    """The local cluster has no registry: every image is preloaded into its containerd."""
    for template in rendered["local"].pod_templates():
        for container in template.containers():
            assert container["image"] in LOCAL_IMAGES.values(), template.name
            assert container["imagePullPolicy"] == "Never", template.name


def test_local_runs_ferretdb_as_mongo(rendered: dict[str, Manifests]) -> None:
    """FerretDB v1.24 on SQLite behind dev's `mongo` Service, checking SCRAM credentials for
    its one user (mongo-admin's, created by --setup-*), which the MongoDB services log in as:
    it cannot give them users of their own (k8s/overlays/local/kustomization.yaml)."""
    import base64

    local = rendered["local"]
    template = local.template("StatefulSet", "mongo")
    (container,) = template.spec["containers"]
    assert container["image"] == "msa.local/ferretdb:1.24.0"
    args = dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"])
    assert args["handler"] == "sqlite"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args["sqlite-url"] == f"file:{mounts['data']}/"
    assert args["state-dir"] == mounts["tmp"]
    assert {v["name"] for v in template.spec["volumes"]} == {"tmp"}  # no init script
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args["listen-addr"] == f":{ports['mongo']}" == ":27017"
    assert args["debug-addr"] == f":{ports['debug']}"
    (service_port,) = local.get("Service", "mongo")["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (27017, "mongo")
    assert "test-enable-new-auth" in args
    assert args["setup-database"] == "admin"
    admin = local.find("Secret", "mongo-admin")
    setup = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container["env"]}
    assert setup == {
        "FERRETDB_SETUP_USERNAME": {"name": admin["metadata"]["name"], "key": "username"},
        "FERRETDB_SETUP_PASSWORD": {"name": admin["metadata"]["name"], "key": "password"},
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/debug/readyz", "port": "debug"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/debug/livez", "port": "debug"}

    user, password = (base64.b64decode(admin["data"][k]).decode() for k in ("username", "password"))
    for service in MONGO_SERVICES:
        secret = local.find("Secret", f"{service}-db")["data"]
        url = base64.b64decode(secret["url"]).decode()
        assert url == f"mongodb://{user}:{password}@mongo:27017/shop_{service}?authSource=admin"
        assert secret.keys() == {"url"}
    rendering = yaml.safe_dump_all(local.docs)
    assert "mongosh" not in rendering
    assert "mongo-init" not in rendering


def test_local_sets_replicas_for_a_rolling_update_without_a_gap(
    rendered: dict[str, Manifests],
) -> None:
    """One of everything, two of the Deployments a rolling update (or a deleted Pod) must not
    interrupt: with maxUnavailable 0 the other replica serves while one is replaced."""
    local = rendered["local"]
    for deployment in local.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        assert deployment["spec"]["replicas"] == (2 if name in LOCAL_ROLLED else 1), name
        if name in LOCAL_ROLLED:
            template = local.template("Deployment", name)
            (container,) = template.spec["containers"]
            assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
            assert "preStop" in container["lifecycle"]
    for statefulset in local.of_kind("StatefulSet"):
        assert statefulset["spec"]["replicas"] == 1, statefulset["metadata"]["name"]


def _milli_cpu(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def _mebibytes(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    return int(quantity[:-2]) * units[quantity[-2:]]


def test_local_requests_fit_its_node(rendered: dict[str, Manifests]) -> None:
    local = rendered["local"]
    cpu = memory = 0
    for template in local.pod_templates():
        if template.kind == "Job":
            pods = 1
        else:
            pods = local.get(template.kind, template.name)["spec"]["replicas"]
            pods += 1 if template.name in LOCAL_ROLLED else 0  # maxSurge
        for container in template.containers():
            requests = container["resources"]["requests"]
            cpu += pods * _milli_cpu(requests["cpu"])
            memory += pods * _mebibytes(requests["memory"])
    assert cpu <= LOCAL_CPU_BUDGET_MILLI, f"{cpu}m of CPU requested"
    assert memory <= LOCAL_MEMORY_BUDGET_MI, f"{memory}Mi of memory requested"


def test_local_exposes_the_gateway_on_the_node(rendered: dict[str, Manifests]) -> None:
    local = rendered["local"]
    service = local.get("Service", "gateway-nodeport")["spec"]
    assert service["type"] == "NodePort"
    assert service["selector"] == {NAME: "gateway"}
    assert service["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "nodePort": 30080}
    ]


# -- the offline validation ------------------------------------------------------------------------


def test_every_checkov_skip_has_a_reason() -> None:
    skips = yaml.safe_load((K8S / "checkov-skips.yaml").read_text())["skips"]
    assert skips
    for check_id, reason in skips.items():
        assert check_id.startswith("CKV"), check_id
        assert isinstance(reason, str), check_id
        assert len(reason.split()) >= 5, f"{check_id}: give a reason"


def _offline() -> list[str]:
    """A command prefix that cuts the network off (a new network namespace) where we may."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


def test_validate_k8s_passes_offline() -> None:
    _kubectl()
    result = subprocess.run(
        [*_offline(), "bash", str(REPO / "scripts" / "validate-k8s")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for overlay in OVERLAYS:
        assert f"== {overlay}" in result.stdout
    assert result.stdout.count(", failed 0, ") == len(OVERLAYS)
