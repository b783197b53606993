"""The Kubernetes manifests of deploy/, rendered with ``kubectl kustomize`` and checked offline.

No cluster is needed: core objects are validated strictly against the Kubernetes OpenAPI schemas
that ``kubernetes-validate`` carries, the RayCluster against KubeRay's CRD (../shared/k8s-schemas),
and the cross-checks catch what no schema can: settings that do not exist, probes on paths the
app does not serve, storage mounted at different places, a Ray address that is not KubeRay's head
Service, images of another Ray, network rules that let the wrong pods in, and a README whose
commands no longer match the manifests.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest
import yaml

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
README = DEPLOY / "README.md"
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: cannot render deploy/")

# What the manifests render: the base, each overlay, and the "own overlay" example of the README.
README_EXAMPLE = "readme-example"
TARGETS = ["deploy/base", "deploy/overlays/dev", "deploy/overlays/gpu", README_EXAMPLE]
NAMESPACE = "hutch"
CONTROL_PLANE = "hutch-control-plane"
CONTROL_PLANE_CONTAINER = "control-plane"
# Where deploy/README.md installs the KubeRay operator, and the labels its Helm chart gives it.
OPERATOR_NAMESPACE = "kuberay-system"
PROMETHEUS_NAMESPACE = "monitoring"  # kube-prometheus-stack's, as deploy/README.md installs it
PROMETHEUS_LABELS = {"app.kubernetes.io/name": "prometheus"}
METRICS_PORT = 8080
OPERATOR_LABELS = {
    "app.kubernetes.io/name": "kuberay-operator",
    "app.kubernetes.io/component": "kuberay-operator",
}
KUBERAY_HELM_REPO = "https://ray-project.github.io/kuberay-helm/"
PROMETHEUS_HELM_REPO = "https://prometheus-community.github.io/helm-charts"
PROMETHEUS_CHART = "prometheus-community/kube-prometheus-stack"
KUBERAY_MIN = (1, 7, 0)  # authOptions.secretName, group-level resources: the CRDs of 1.7.0
RAY_TOKEN_AUTH = (2, 52, 0)  # the first Ray with token authentication
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay reads the token from
DASHBOARD_PORT = 8265
# Conditions KubeRay sets on a RayCluster (ray-operator/apis/ray/v1/raycluster_types.go).
RAYCLUSTER_CONDITIONS = {"RayClusterProvisioned", "HeadPodReady"}
GPU = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
COMMON_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/version")
COMPONENTS = {"control-plane", "ray", "monitoring"}
# Objects that belong to neither side: the namespace itself and the volume both sides share.
SHARED_KINDS = {"Namespace", "PersistentVolumeClaim"}


def _project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


PROJECT_VERSION = _project()["version"]


def _pinned_ray() -> str:
    for requirement in _project()["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([0-9.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml pins no Ray version (ray[...]==X.Y.Z)")


RAY_VERSION = _pinned_ray()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# -- rendering ---------------------------------------------------------------------------------------


def _kustomize(directory: Path, label: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {label} failed:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert docs, f"kubectl kustomize {label} rendered nothing"
    return docs


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def _readme_kustomization() -> str:
    found = [block for block in _readme_blocks("yaml") if re.search(r"^kind: Kustomization$", block, re.M)]
    assert len(found) == 1, f"deploy/README.md should show one own-overlay kustomization, found {len(found)}"
    return found[0]


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize`` renders for a target (the README's example is rendered
    as ``my-cluster/`` beside a ``deploy/`` that is this repository's)."""
    if target != README_EXAMPLE:
        return tuple(_kustomize(ROOT / target, target))
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "deploy").symlink_to(DEPLOY)
        overlay = Path(scratch) / "my-cluster"
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(_readme_kustomization())
        return tuple(_kustomize(overlay, "the own-overlay example of deploy/README.md"))


def ident(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}{f'/{name}' if name else ''}, found {len(found)}"
    return found[0]


def deployment(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "Deployment", CONTROL_PLANE)


def control_plane_container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = deployment(docs)["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == CONTROL_PLANE_CONTAINER]
    assert found, f"Deployment/{CONTROL_PLANE} has no container {CONTROL_PLANE_CONTAINER!r}"
    return found[0]


def raycluster(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "RayCluster")


class RayPod(NamedTuple):
    """One kind of Ray pod as KubeRay will create it: its template and the labels it will carry."""

    where: str  # "RayCluster/x head" or "RayCluster/x worker group g"
    group: dict[str, Any]  # headGroupSpec or a workerGroupSpecs item
    spec: dict[str, Any]
    labels: dict[str, str]

    @property
    def ray_container(self) -> dict[str, Any]:
        return self.spec["containers"][0]  # KubeRay's Ray container is the first


def ray_pods(docs: tuple[dict[str, Any], ...]) -> list[RayPod]:
    cluster = raycluster(docs)
    name = cluster["metadata"]["name"]
    groups = [("head", "headgroup", cluster["spec"]["headGroupSpec"])]
    groups += [("worker", g["groupName"], g) for g in cluster["spec"].get("workerGroupSpecs", [])]
    pods = []
    for node_type, group_name, group in groups:
        template = group["template"]
        labels = dict(template.get("metadata", {}).get("labels", {}))
        labels.update({"ray.io/cluster": name, "ray.io/node-type": node_type, "ray.io/group": group_name})
        where = (
            f"{ident(cluster)} head" if node_type == "head" else f"{ident(cluster)} worker group {group_name}"
        )
        pods.append(RayPod(where, group, template["spec"], labels))
    return pods


class SecretKey(NamedTuple):
    name: str
    key: str
    optional: bool


def container_env(container: dict[str, Any], docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The container's environment: plain values (from ``env`` and ConfigMaps, explicit entries
    winning as in Kubernetes), and :class:`SecretKey` for values from Secrets."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"container {container['name']}: envFrom {source} cannot be checked"
        name = source["configMapRef"]["name"]
        maps = find(docs, "ConfigMap", name)
        assert maps, f"container {container['name']}: envFrom names ConfigMap {name}, which is not rendered"
        env.update({source.get("prefix", "") + k: v for k, v in maps[0].get("data", {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = SecretKey(ref["name"], ref["key"], bool(ref.get("optional", False)))
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = one(docs, "ConfigMap", ref["name"]).get("data", {})[ref["key"]]
        else:
            env[item["name"]] = item.get("valueFrom")
    return env


def control_plane_env(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return container_env(control_plane_container(docs), docs)


def settings_variables() -> set[str]:
    """Every environment variable that service.settings.Settings reads."""
    from service.settings import Settings

    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"HUTCH_{name.upper()}")
        alias = field.validation_alias
        for choice in getattr(alias, "choices", [alias]):
            if isinstance(choice, str) and choice.startswith("HUTCH_"):
                names.add(choice)
    return names


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number (CPUs, bytes, GPUs)."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "Ti": 2**40}  # fmt: skip
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match and (match.group(2) in units or not match.group(2)), f"not a quantity: {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1.0)


def ray_resources(pod: RayPod) -> tuple[float, float]:
    """(CPUs, GPUs) Ray gives one such pod: rayStartParams if set, else the container's limits."""
    params = pod.group.get("rayStartParams", {}) or {}
    resources = pod.ray_container.get("resources", {})
    limits = {**resources.get("requests", {}), **resources.get("limits", {})}
    cpus = float(params["num-cpus"]) if "num-cpus" in params else quantity(limits.get("cpu", 0))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else quantity(limits.get(GPU, 0))
    return cpus, gpus


def mount_for(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The deepest volume mount that contains ``path``."""
    target = PurePosixPath(path)
    found = [
        m for m in container.get("volumeMounts", [])
        if target == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in target.parents
    ]  # fmt: skip
    return max(found, key=lambda m: len(m["mountPath"]), default=None)


def volume(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in pod_spec.get("volumes", []) if v["name"] == name]
    assert found, f"no volume {name!r} in the pod"
    return found[0]


def all_pod_specs(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    pods = [(ident(deployment(docs)), deployment(docs)["spec"]["template"]["spec"])]
    return pods + [(pod.where, pod.spec) for pod in ray_pods(docs)]


class Routes:
    """Which requests the app serves, asked of its router as a request would (the app is built,
    not started: no database, no Ray)."""

    def __init__(self, data_dir: Path) -> None:
        from api.app import create_app
        from service.settings import Settings

        self.app = create_app(Settings(api_tokens=["probe-test"], data_dir=data_dir))

    def serves(self, path: str, method: str = "GET") -> bool:
        from starlette.routing import Match

        scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [],
                 "query_string": b""}  # fmt: skip
        return any(route.matches(scope)[0] == Match.FULL for route in self.app.router.routes)


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> Routes:
    return Routes(tmp_path_factory.mktemp("hutch"))


# -- rendering and schemas ---------------------------------------------------------------------------


CLUSTER_SCOPED = {"PriorityClass"}
PRUNE_PROTECTION = {  # what Argo CD and Flux honour: never prune or delete this object
    "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
    "kustomize.toolkit.fluxcd.io/prune": "disabled",
}


@pytest.mark.parametrize("target", TARGETS)
def test_renders_into_one_namespace_it_cannot_delete(target: str) -> None:
    """Every object goes into the namespace, which is not itself rendered: `kubectl delete -k` or a
    GitOps prune of an overlay cannot take the namespace, its Secrets and its volume with it."""
    docs = render(target)
    seen = set()
    for obj in docs:
        assert ident(obj) not in seen, f"{target}: {ident(obj)} is rendered twice"
        seen.add(ident(obj))
        expected = None if obj["kind"] in CLUSTER_SCOPED else NAMESPACE
        assert obj["metadata"].get("namespace") == expected, f"{target}: {ident(obj)} is not in {expected}"
    assert not find(docs, "Namespace"), f"{target}: the namespace is part of what a prune deletes"


def test_the_namespace_enforces_restricted_and_is_never_pruned() -> None:
    namespace = yaml.safe_load((DEPLOY / "namespace.yaml").read_text())
    assert (namespace["kind"], namespace["metadata"]["name"]) == ("Namespace", NAMESPACE)
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", labels
    assert PRUNE_PROTECTION.items() <= namespace["metadata"]["annotations"].items()
    assert _validate_core(namespace, _core_versions()[-1]) is None


@pytest.mark.parametrize("target", TARGETS)
def test_the_storage_volume_is_never_pruned(target: str) -> None:
    claim = one(render(target), "PersistentVolumeClaim", "hutch-storage")
    assert PRUNE_PROTECTION.items() <= claim["metadata"].get("annotations", {}).items(), (
        f"{target}: a GitOps prune would delete every checkpoint"
    )


def _validate_core(obj: dict[str, Any], version: str) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(p) for p in error.absolute_path) or "(top)"
        return f"{ident(obj)} at {where}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError as error:
        return f"{ident(obj)}: {error.message}"
    return None


def _core_versions() -> list[str]:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed"
    )
    # A release many clusters still run, and the newest one kubernetes-validate knows.
    return ["1.30", kubernetes_validate.utils.latest_version()]


def _is_core(obj: dict[str, Any]) -> bool:
    """Kubernetes' own API groups (v1, apps/v1, networking.k8s.io/v1, ...), not a CRD's."""
    group = obj["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_validate_strictly(target: str) -> None:
    versions = _core_versions()
    core = [obj for obj in render(target) if _is_core(obj)]
    assert core, f"{target}: no core objects rendered"
    problems = [p for version in versions for obj in core if (p := _validate_core(obj, version))]
    assert not problems, f"{target}: objects the API server would refuse:\n" + "\n".join(problems)


def test_core_validation_is_strict() -> None:
    """The validator refuses a misspelt field (which a lenient apply would drop silently)."""
    versions = _core_versions()
    broken = copy.deepcopy(deployment(render("deploy/overlays/dev")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbee"] = {}
    assert _validate_core(broken, versions[-1]), "a Deployment with an unknown field passed strict validation"


def _strict(schema: Any) -> Any:
    """A CRD schema as the API server's strict field validation applies it: unknown fields are
    errors where the schema lists properties and does not preserve unknown fields; int-or-string
    is spelt as JSON schema."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema and "type" not in schema:
            schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def _raycluster_validator() -> Any:
    import jsonschema

    # 17,000 lines: libyaml's loader where PyYAML has it (10x faster than the pure-Python one).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / "ray.io_rayclusters.yaml").read_text(), Loader=loader)
    versions = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert versions, "the RayCluster CRD has no v1 version"
    return jsonschema.Draft7Validator(_strict(versions[0]["schema"]["openAPIV3Schema"]))


def schema_problems(validator: Any, obj: dict[str, Any]) -> list[str]:
    """Every error ``validator`` finds in ``obj``, with where in the object it is."""
    errors = validator.iter_errors(obj)
    return [f"{ident(obj)} at {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]


def _crd_problems(obj: dict[str, Any]) -> list[str]:
    return schema_problems(_raycluster_validator(), obj)


def needs_schema(file: str, what: str) -> pytest.MarkDecorator:
    """Skip unless ``file`` is among the schemas in ../shared/k8s-schemas (CI has them)."""
    return pytest.mark.skipif(
        not (SCHEMAS / file).exists(), reason=f"{what} are not at {SCHEMAS} (see its README)"
    )


needs_schemas = needs_schema("ray.io_rayclusters.yaml", "the KubeRay CRD schemas")


@needs_schemas
@pytest.mark.parametrize("target", TARGETS)
def test_rayclusters_validate_against_kuberay_crd(target: str) -> None:
    clusters = find(render(target), "RayCluster")
    assert clusters, f"{target}: no RayCluster rendered"
    for cluster in clusters:
        assert cluster["apiVersion"] == "ray.io/v1", f"{target}: {ident(cluster)} is {cluster['apiVersion']}"
        problems = _crd_problems(cluster)
        assert not problems, f"{target}: the KubeRay CRD refuses:\n" + "\n".join(problems)


@needs_schemas
def test_crd_validation_is_strict() -> None:
    cluster = raycluster(render("deploy/overlays/gpu"))
    for mutate in (
        lambda c: c["spec"]["headGroupSpec"].update(rayStartParam={}),
        lambda c: c["spec"]["workerGroupSpecs"][-1]["template"]["spec"]["containers"][0].update(imag="x"),
        lambda c: c["spec"]["workerGroupSpecs"][0].update(minReplicas="one"),
    ):
        broken = copy.deepcopy(cluster)
        mutate(broken)
        assert _crd_problems(broken), "a RayCluster with an unknown or mistyped field passed validation"


# -- the control plane --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_control_plane_env_vars_are_settings(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = control_plane_env(render(target))
    known = settings_variables()
    unknown = sorted(name for name in env if name.startswith("HUTCH_") and name not in known)
    assert not unknown, f"{target}: {ident(deployment(render(target)))} sets {unknown}, not settings"
    # Every value parses as its setting (a Secret's value stands in with a plausible one).
    for name in list(os.environ):
        if name.startswith("HUTCH_") or name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            monkeypatch.delenv(name)
    stand_ins = {"HUTCH_DATABASE_URL": "postgresql+psycopg://hutch:pw@db/hutch"}
    for name, value in env.items():
        if name.startswith("HUTCH_"):
            monkeypatch.setenv(
                name, stand_ins.get(name, "token") if isinstance(value, SecretKey) else str(value)
            )
    from service.settings import Settings

    Settings()  # raises, naming the variable, if one does not parse


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_stay_in_secrets(target: str) -> None:
    docs = render(target)
    env = control_plane_env(docs)
    assert isinstance(env.get("HUTCH_API_TOKENS"), SecretKey), (
        f"{target}: HUTCH_API_TOKENS must come from a Secret, not {env.get('HUTCH_API_TOKENS')!r}"
    )
    assert env.get("HUTCH_RAY_AUTH_TOKEN_FILE") in secret_files(docs), f"{target}: the Ray token is no Secret"
    url = env.get("HUTCH_DATABASE_URL")
    if isinstance(url, str):
        from sqlalchemy.engine import make_url

        assert make_url(url).password is None, f"{target}: a database password is in plain configuration"
    assert not find(docs, "Secret"), f"{target}: Secrets are rendered; credentials must not be in git"


@pytest.mark.parametrize("target", TARGETS)
def test_probes_and_service_reach_the_port_the_server_listens_on(target: str, routes: Routes) -> None:
    docs = render(target)
    container = control_plane_container(docs)
    words = container.get("command", []) + container.get("args", [])
    assert words[:2] == ["hutch", "serve"], f"{target}: the control plane runs {words}, not `hutch serve`"
    options = dict(zip(words[2::2], words[3::2]))
    assert options.get("--host") == "0.0.0.0", f"{target}: `hutch serve` must listen on 0.0.0.0 in the pod"
    listen = int(options.get("--port", "8000"))
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert listen in ports.values(), (
        f"{target}: container port {listen} (`hutch serve --port`) is not declared"
    )

    def resolve(port: int | str) -> int:
        return ports[port] if isinstance(port, str) else port

    probes = {kind: container.get(kind) for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{target}: readiness must ask /readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{target}: liveness must ask /healthz"
    for kind, probe in probes.items():
        if probe is None:
            continue
        path, port = probe["httpGet"]["path"], probe["httpGet"]["port"]
        assert routes.serves(path), f"{target}: {kind} asks {path}, which the app does not serve"
        assert resolve(port) == listen, f"{target}: {kind} asks port {port}, the server listens on {listen}"
    service = one(docs, "Service", "hutch")
    labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= labels.items(), (
        f"{target}: Service/hutch selects {selector}, pods have {labels}"
    )
    for port in service["spec"]["ports"]:
        target_port = resolve(port.get("targetPort", port["port"]))
        assert target_port == listen, f"{target}: Service/hutch port {port['port']} goes to {target_port}"


@pytest.mark.parametrize("target", TARGETS)
def test_replicas_fit_their_database_and_updates_keep_one_serving(target: str) -> None:
    """Several replicas only on a database server (SQLite on a volume is one process's), then
    updated one at a time with a PodDisruptionBudget that keeps one and lets a drain proceed,
    spread over nodes; one replica is replaced with Recreate and has no budget (it could only
    block drains). The gpu overlay, and so the README's own overlay, runs two."""
    docs = render(target)
    spec = deployment(docs)["spec"]
    replicas = spec.get("replicas", 1)
    labels = spec["template"]["metadata"]["labels"]
    budgets = [b for b in find(docs, "PodDisruptionBudget") if _matches(b["spec"]["selector"], labels)]
    strategy = spec.get("strategy", {})
    if target in ("deploy/overlays/gpu", README_EXAMPLE):
        assert replicas == 2, f"{target}: {replicas} control-plane replicas, not 2"
    if replicas == 1:
        assert strategy.get("type") == "Recreate", f"{target}: one replica is replaced with Recreate"
        assert not budgets, f"{target}: a PodDisruptionBudget for one replica can only block drains"
    else:
        env = control_plane_env(docs)
        assert "HUTCH_DATABASE_URL" in env and not str(env["HUTCH_DATABASE_URL"]).startswith("sqlite"), (
            f"{target}: {replicas} replicas need a database server, not SQLite on a volume"
        )
        assert strategy.get("type") == "RollingUpdate", f"{target}: {strategy}"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, f"{target}: an update takes a replica away"
        assert len(budgets) == 1, f"{target}: no PodDisruptionBudget keeps a replica through drains"
        budget = budgets[0]["spec"]
        assert 1 <= budget.get("minAvailable", 0) < replicas, (
            f"{target}: minAvailable {budget.get('minAvailable')} of {replicas}: none kept, or drains blocked"
        )
        spread = spec["template"]["spec"].get("topologySpreadConstraints", [])
        per_node = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
        assert any(_matches(c["labelSelector"], labels) for c in per_node), (
            f"{target}: the replicas may all land on one node"
        )
    for obj in find(docs, "HorizontalPodAutoscaler"):
        assert not _matches({"matchLabels": obj["spec"].get("scaleTargetRef", {})}, labels), target
    selector = spec["selector"]["matchLabels"]
    assert "app.kubernetes.io/version" not in selector, f"{target}: a version in the (immutable) selector"


# -- storage -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_storage_is_the_same_volume_at_the_same_path_everywhere(target: str) -> None:
    docs = render(target)
    env = control_plane_env(docs)
    storage = env.get("HUTCH_STORAGE_PATH")
    assert isinstance(storage, str) and storage.startswith("/"), (
        f"{target}: HUTCH_STORAGE_PATH is {storage!r}"
    )
    plane_spec = deployment(docs)["spec"]["template"]["spec"]
    mount = mount_for(control_plane_container(docs), storage)
    assert mount, f"{target}: HUTCH_STORAGE_PATH {storage} is on no volume of {ident(deployment(docs))}"
    claim = volume(plane_spec, mount["name"]).get("persistentVolumeClaim", {}).get("claimName")
    assert claim, f"{target}: {storage} is on volume {mount['name']}, not a PersistentVolumeClaim"
    assert find(docs, "PersistentVolumeClaim", claim), (
        f"{target}: PersistentVolumeClaim/{claim} is not rendered"
    )
    for pod in ray_pods(docs):
        container = pod.ray_container
        ray_mount = mount_for(container, storage)
        assert ray_mount, f"{target}: {pod.where}: {storage} is on no volume of container {container['name']}"
        ray_claim = volume(pod.spec, ray_mount["name"]).get("persistentVolumeClaim", {}).get("claimName")
        assert (ray_claim, ray_mount["mountPath"]) == (claim, mount["mountPath"]), (
            f"{target}: {pod.where} mounts {ray_claim} at {ray_mount['mountPath']}; "
            f"the control plane mounts {claim} at {mount['mountPath']}"
        )
        ray_storage = container_env(container, docs).get("HUTCH_STORAGE_PATH", storage)
        assert ray_storage == storage, f"{target}: {pod.where} has HUTCH_STORAGE_PATH {ray_storage}"


@pytest.mark.parametrize("target", TARGETS)
def test_the_control_plane_writes_only_to_volumes(target: str) -> None:
    """The root filesystem is read-only: the data dir and /tmp are emptyDirs, a SQLite store is on
    the shared volume (an emptyDir would lose every job at the first restart)."""
    docs = render(target)
    env = control_plane_env(docs)
    container = control_plane_container(docs)
    spec = deployment(docs)["spec"]["template"]["spec"]
    for path in (env.get("HUTCH_DATA_DIR"), "/tmp"):
        assert isinstance(path, str), (
            f"{target}: HUTCH_DATA_DIR is not set (the image user's home is read-only)"
        )
        mount = mount_for(container, path)
        assert mount and "emptyDir" in volume(spec, mount["name"]), f"{target}: {path} is not on an emptyDir"
    url = env.get("HUTCH_DATABASE_URL")
    if isinstance(url, str) and url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        database = make_url(url).database or ""
        mount = mount_for(container, database)
        assert mount and "persistentVolumeClaim" in volume(spec, mount["name"]), (
            f"{target}: the SQLite store {database} is not on the persistent volume"
        )


# -- Ray -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_ray_address_is_the_head_service_kuberay_creates(target: str) -> None:
    docs = render(target)
    cluster = raycluster(docs)
    service = f"{cluster['metadata']['name']}-head-svc"
    hosts = {
        service,
        f"{service}.{NAMESPACE}",
        f"{service}.{NAMESPACE}.svc",
        f"{service}.{NAMESPACE}.svc.cluster.local",
    }
    env = control_plane_env(docs)
    assert env.get("HUTCH_RAY_ADDRESS"), (
        f"{target}: no HUTCH_RAY_ADDRESS: the pod would start a Ray head of its own"
    )
    for name in ("HUTCH_RAY_ADDRESS", "HUTCH_RAY_DASHBOARD_URL"):
        if name not in env:
            continue
        url = urlsplit(str(env[name]))
        assert (url.scheme, url.hostname, url.port) in {("http", h, DASHBOARD_PORT) for h in hosts}, (
            f"{target}: {name}={env[name]} is not KubeRay's head Service http://{service}:{DASHBOARD_PORT}"
        )
    head = ray_pods(docs)[0]
    ports = {p["containerPort"] for p in head.ray_container.get("ports", [])}
    assert DASHBOARD_PORT in ports, (
        f"{target}: {head.where} does not expose the dashboard port {DASHBOARD_PORT}"
    )


@pytest.mark.parametrize("target", TARGETS)
def secret_files(docs: tuple[dict[str, Any], ...]) -> dict[str, SecretKey]:
    """The control plane's files that Secrets provide: path -> (Secret, key). Only whole-volume
    mounts count: a subPath mount is never updated when its Secret changes."""
    spec = deployment(docs)["spec"]["template"]["spec"]
    files = {}
    for mount in control_plane_container(docs).get("volumeMounts", []):
        source = volume(spec, mount["name"]).get("secret")
        if source and "subPath" not in mount:
            items = source.get("items") or []
            for item in items:
                path = str(PurePosixPath(mount["mountPath"]) / item["path"])
                files[path] = SecretKey(
                    source["secretName"], item["key"], bool(source.get("optional", False))
                )
    return files


@pytest.mark.parametrize("target", TARGETS)
def test_ray_token_is_a_file_of_the_secret_the_raycluster_names(target: str) -> None:
    """Ray and the control plane read the token from one Secret the installer manages
    (authOptions.secretName); the control plane reads it as a file, which Kubernetes updates when
    the Secret changes, so a rotation needs no restart."""
    docs = render(target)
    cluster = raycluster(docs)
    auth = cluster["spec"].get("authOptions", {})
    assert auth.get("mode") == "token", (
        f"{target}: {ident(cluster)} spec.authOptions.mode is {auth.get('mode')}"
    )
    assert _version(cluster["spec"]["rayVersion"]) >= RAY_TOKEN_AUTH, f"{target}: Ray too old for token auth"
    assert auth.get("secretName"), f"{target}: the Ray token is one KubeRay generates: nobody can rotate it"
    env = control_plane_env(docs)
    assert "HUTCH_RAY_AUTH_TOKEN" not in env, f"{target}: a token in the environment is never re-read"
    path = env.get("HUTCH_RAY_AUTH_TOKEN_FILE")
    assert secret_files(docs).get(path) == SecretKey(auth["secretName"], RAY_TOKEN_KEY, False), (
        f"{target}: HUTCH_RAY_AUTH_TOKEN_FILE={path} is not the key {RAY_TOKEN_KEY} of Secret "
        f"{auth['secretName']} mounted whole ({secret_files(docs)})"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_images_run_the_pinned_ray(target: str) -> None:
    docs = render(target)
    cluster = raycluster(docs)
    assert cluster["spec"]["rayVersion"] == RAY_VERSION, (
        f"{target}: {ident(cluster)} runs Ray {cluster['spec']['rayVersion']}, pyproject pins {RAY_VERSION}"
    )
    uses_gpus = any(ray_resources(pod)[1] for pod in ray_pods(docs))
    images = [(pod.where, c["image"]) for pod in ray_pods(docs) for c in pod.spec["containers"]]
    if cluster["spec"].get("autoscalerOptions", {}).get("image"):
        images.append((f"{ident(cluster)} autoscaler", cluster["spec"]["autoscalerOptions"]["image"]))
    for where, image in images:
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and "/" not in tag and tag != "latest", (
            f"{target}: {where}: image {image} has no pinned tag"
        )
        assert f"ray{RAY_VERSION}" in tag, f"{target}: {where}: image {image} is not of Ray {RAY_VERSION}"
        assert tag.startswith(f"{PROJECT_VERSION}-"), (
            f"{target}: {where}: image {image} is not hutch {PROJECT_VERSION}"
        )
        flavour = "-cu" if uses_gpus else "-cpu"
        assert flavour in tag, f"{target}: {where}: image {image} is not a {flavour.strip('-')} build"
    assert len({image for _, image in images}) == 1, f"{target}: Ray pods run different images: {images}"
    plane = control_plane_container(docs)["image"]
    assert plane.partition("@")[0].rpartition(":")[2] == PROJECT_VERSION, (
        f"{target}: control-plane image {plane} is not {PROJECT_VERSION}"
    )


PLACEHOLDER_REGISTRY = "registry.invalid"  # RFC 6761: never resolves


def registry(image: str) -> str:
    """The registry an image reference is pulled from, as container runtimes read it: the first
    path part when it has a dot or a port or is localhost, else Docker Hub."""
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def every_image(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, str]]:
    images = [(where, c["image"]) for where, spec in all_pod_specs(docs)
              for c in spec.get("initContainers", []) + spec["containers"]]  # fmt: skip
    autoscaler = raycluster(docs)["spec"].get("autoscalerOptions", {}).get("image")
    return images + ([("autoscaler", autoscaler)] if autoscaler else [])


@pytest.mark.parametrize("target", TARGETS)
def test_no_image_resolves_to_docker_hub(target: str) -> None:
    """hutch's images resolve to a registry the installer names (a placeholder that cannot pull
    until they do, localhost/ for kind and minikube), never to Docker Hub's hutch/, which nobody
    here owns; the README's own overlay pins them by digest."""
    images = every_image(render(target))
    hub = [(where, image) for where, image in images if registry(image) == "docker.io"]
    assert not hub, f"{target}: images pulled from Docker Hub: {hub}"
    registries = {registry(image) for _, image in images}
    expected = {
        "deploy/overlays/dev": {"localhost"},
        README_EXAMPLE: {"registry.example.com"},
    }.get(target, {PLACEHOLDER_REGISTRY})
    assert registries == expected, f"{target}: images from {registries}, not {expected}"
    if target == README_EXAMPLE:
        unpinned = [image for _, image in images if not re.search(r"@sha256:[0-9a-f]{64}$", image)]
        assert not unpinned, f"the README's own overlay does not pin these by digest: {unpinned}"


def test_registry_check_can_fail() -> None:
    assert registry("hutch/ray:1") == registry("docker.io/hutch/ray:1") == registry("ray:1") == "docker.io"
    assert registry("localhost/hutch/ray:1") == "localhost"
    assert registry("registry.example.com/ml/hutch-ray@sha256:" + "0" * 64) == "registry.example.com"
    assert registry("myhost:5000/hutch/ray:1") == "myhost:5000"


@pytest.mark.parametrize("target", TARGETS)
def test_autoscaling_limits_match_the_admission_settings(target: str) -> None:
    docs = render(target)
    cluster = raycluster(docs)
    assert cluster["spec"].get("enableInTreeAutoscaling") is True, (
        f"{target}: {ident(cluster)} does not autoscale"
    )
    pods = ray_pods(docs)
    cpus = ray_resources(pods[0])[0]
    gpus = ray_resources(pods[0])[1]
    for pod in pods[1:]:
        low, high = pod.group.get("minReplicas", 0), pod.group.get("maxReplicas")
        assert high is not None and 0 <= low <= high and high >= 1, (
            f"{target}: {pod.where}: min {low}, max {high}"
        )
        assert "replicas" not in pod.group, (
            f"{target}: {pod.where}: `replicas` would reset the autoscaler on apply"
        )
        cpus += high * ray_resources(pod)[0]
        gpus += high * ray_resources(pod)[1]
    env = control_plane_env(docs)
    for name, expected in (("HUTCH_MAX_CLUSTER_CPUS", cpus), ("HUTCH_MAX_CLUSTER_GPUS", gpus)):
        assert name in env, (
            f"{target}: {name} unset: jobs larger than the cluster now are refused while it can grow"
        )
        assert float(env[name]) == expected, (
            f"{target}: {name}={env[name]}, but the worker groups reach {expected:g} at maxReplicas"
        )


def test_head_takes_no_training() -> None:
    for target in TARGETS:
        head = ray_pods(render(target))[0]
        assert ray_resources(head)[0] == 0, f"{target}: {head.where} offers CPUs to training workers"


def test_gpu_overlay_has_a_gpu_worker_group_on_tainted_nodes() -> None:
    docs = render("deploy/overlays/gpu")
    gpu_pods = [pod for pod in ray_pods(docs) if ray_resources(pod)[1] > 0]
    assert gpu_pods, "overlays/gpu: no worker group has GPUs"
    for pod in gpu_pods:
        assert pod.labels["ray.io/node-type"] == "worker", f"overlays/gpu: {pod.where} has GPUs"
        resources = pod.ray_container["resources"]
        requested, limited = resources.get("requests", {}).get(GPU), resources.get("limits", {}).get(GPU)
        assert limited and quantity(limited) >= 1, f"overlays/gpu: {pod.where} has no {GPU} limit"
        assert requested is None or quantity(requested) == quantity(limited), (
            f"overlays/gpu: {pod.where}: {GPU}"
        )
        assert GPU_TOLERATION in pod.spec.get("tolerations", []), (
            f"overlays/gpu: {pod.where} lacks {GPU_TOLERATION}"
        )
    env = control_plane_env(docs)
    assert env.get("HUTCH_DATABASE_URL") == SecretKey("hutch-secrets", "database-url", False), (
        f"overlays/gpu: HUTCH_DATABASE_URL is {env.get('HUTCH_DATABASE_URL')!r}, not from hutch-secrets"
    )
    base, gpu = (one(render(t), "PersistentVolumeClaim") for t in ("deploy/base", "deploy/overlays/gpu"))
    size = [quantity(p["spec"]["resources"]["requests"]["storage"]) for p in (base, gpu)]
    assert size[1] > size[0], f"overlays/gpu: the volume ({size[1]:g} bytes) is not larger than the base's"
    for target, claim in (("deploy/base", base), ("deploy/overlays/gpu", gpu)):
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], f"{target}: {ident(claim)} is not RWX"
        # The storage class is the cluster's choice (a documented patch), not the manifests'.
        assert "storageClassName" not in claim["spec"], f"{target}: {ident(claim)} names a storage class"


def test_dev_overlay_is_cpu_only_with_sqlite() -> None:
    docs = render("deploy/overlays/dev")
    for where, spec in all_pod_specs(docs):
        for container in spec["containers"]:
            resources = container.get("resources", {})
            assert GPU not in {**resources.get("requests", {}), **resources.get("limits", {})}, (
                f"overlays/dev: {where} container {container['name']} asks for a GPU"
            )
    url = control_plane_env(docs).get("HUTCH_DATABASE_URL")
    assert isinstance(url, str) and url.startswith("sqlite:"), f"overlays/dev: HUTCH_DATABASE_URL is {url!r}"


# -- pod security and labels ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_unprivileged_as_one_user(target: str) -> None:
    docs = render(target)
    identities = {}
    for where, spec in all_pod_specs(docs):
        pod = spec.get("securityContext", {})
        identities[where] = tuple(pod.get(k) for k in ("runAsUser", "runAsGroup", "fsGroup"))
        for container in spec["containers"]:
            own = container.get("securityContext", {})
            merged = {**pod, **own}
            name = f"{target}: {where} container {container['name']}"
            assert merged.get("runAsNonRoot") is True, f"{name}: runAsNonRoot is not set"
            assert own.get("allowPrivilegeEscalation") is False, (
                f"{name}: allowPrivilegeEscalation is not false"
            )
            assert own.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities are not dropped"
            assert merged.get("seccompProfile", {}).get("type") == "RuntimeDefault", (
                f"{name}: no RuntimeDefault"
            )
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources.get(part, {}).keys(), f"{name}: no cpu/memory {part}"
    assert len(set(identities.values())) == 1 and None not in next(iter(identities.values())), (
        f"{target}: pods sharing the volume run as different users/groups: {identities}"
    )
    plane = control_plane_container(docs)
    assert plane["securityContext"].get("readOnlyRootFilesystem") is True, (
        f"{target}: control plane root is writable"
    )
    spec = deployment(docs)["spec"]["template"]["spec"]
    assert spec.get("automountServiceAccountToken") is False, f"{target}: the control plane gets an API token"
    account = one(docs, "ServiceAccount", spec["serviceAccountName"])
    assert account.get("automountServiceAccountToken") is False, f"{target}: {ident(account)} mounts a token"
    assert spec.get("enableServiceLinks") is False, (
        f"{target}: service links put HUTCH_PORT, HUTCH_RAY_HEAD_SVC_* into the settings' namespace"
    )
    autoscaler = raycluster(docs)["spec"].get("autoscalerOptions", {})
    assert autoscaler.get("securityContext", {}).get("allowPrivilegeEscalation") is False, (
        f"{target}: the autoscaler sidecar runs without a security context"
    )
    assert {"requests", "limits"} <= autoscaler.get("resources", {}).keys(), f"{target}: autoscaler unbounded"


@pytest.mark.parametrize("target", TARGETS)
def test_ray_scratch_space_is_bounded_and_requested(target: str) -> None:
    """/tmp/ray (logs, spilled objects, runtime envs) is an emptyDir with a size limit, under the
    name KubeRay shares with the autoscaler, and each Ray container requests the ephemeral storage
    its disk-backed emptyDirs may take, so a full disk evicts that pod, not the node's others."""
    for pod in ray_pods(render(target)):
        container = pod.ray_container
        mount = mount_for(container, "/tmp/ray/session_latest/logs")
        assert mount and mount["mountPath"] == "/tmp/ray", (
            f"{target}: {pod.where}: /tmp/ray is the container layer"
        )
        assert mount["name"] == "ray-logs", (
            f"{target}: {pod.where}: KubeRay's autoscaler shares the volume ray-logs"
        )
        on_disk = [
            v for v in pod.spec["volumes"] if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
        ]
        assert all("sizeLimit" in v["emptyDir"] for v in on_disk), (
            f"{target}: {pod.where}: unbounded emptyDir"
        )
        resources = container["resources"]
        request = quantity(resources["requests"].get("ephemeral-storage", 0))
        assert request == quantity(resources["limits"].get("ephemeral-storage", -1)), f"{target}: {pod.where}"
        assert request > sum(quantity(v["emptyDir"]["sizeLimit"]) for v in on_disk), (
            f"{target}: {pod.where}: {request / 2**30:.0f} GiB ephemeral storage: no room for the layer"
        )


@pytest.mark.parametrize("target", TARGETS)
def test_the_head_is_not_evicted_by_drains_or_preempted_by_training(target: str) -> None:
    docs = render(target)
    head, *workers = ray_pods(docs)
    budget = one(docs, "PodDisruptionBudget", "hutch-ray-head")["spec"]
    assert budget.get("maxUnavailable") == 0 or budget.get("minAvailable") == 1, budget
    assert _matches(budget["selector"], head.labels), f"{target}: the head's budget does not select it"
    assert not any(_matches(budget["selector"], w.labels) for w in workers), (
        f"{target}: the budget holds workers"
    )
    priority = one(docs, "PriorityClass", head.spec.get("priorityClassName"))
    assert 0 < priority["value"] < 1_000_000_000 and not priority.get("globalDefault"), priority
    assert all(w.spec.get("priorityClassName") in (None, "") for w in workers), (
        f"{target}: workers outrank jobs"
    )


TOKEN_DIR = PurePosixPath("/var/run/secrets/kubernetes.io")


def _token_volumes(spec: dict[str, Any]) -> set[str]:
    """The pod's volumes that carry a service-account token (projected ones: the Secrets hutch
    mounts are its own, never of type service-account-token)."""
    names = set()
    for item in spec.get("volumes", []):
        sources = item.get("projected", {}).get("sources", [])
        if any("serviceAccountToken" in source for source in sources):
            names.add(item["name"])
    return names


def token_holders(docs: tuple[dict[str, Any], ...]) -> list[str]:
    """Every container that would hold a Kubernetes API credential: one in a pod whose token is
    automounted (the pod's setting, else its service account's; KubeRay's accounts automount), or
    one that mounts a token volume or anything under /var/run/secrets/kubernetes.io. KubeRay's
    autoscaler container is counted from ``autoscalerOptions.volumeMounts``."""
    accounts = {a["metadata"]["name"]: a for a in find(docs, "ServiceAccount")}
    holders = []
    for where, spec in all_pod_specs(docs):
        account = accounts.get(spec.get("serviceAccountName", ""), {})
        automount = spec.get(
            "automountServiceAccountToken", account.get("automountServiceAccountToken", True)
        )
        tokens = _token_volumes(spec)
        for container in spec.get("initContainers", []) + spec["containers"]:
            mounts = container.get("volumeMounts", [])
            if automount is not False or any(
                m["name"] in tokens
                or TOKEN_DIR in [PurePosixPath(m["mountPath"]), *PurePosixPath(m["mountPath"]).parents]
                for m in mounts
            ):
                holders.append(f"{where} container {container['name']}")
    cluster = raycluster(docs)["spec"]
    head_tokens = _token_volumes(cluster["headGroupSpec"]["template"]["spec"])
    if any(m["name"] in head_tokens for m in cluster.get("autoscalerOptions", {}).get("volumeMounts", [])):
        holders.append("autoscaler")
    return holders


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_autoscaler_holds_a_service_account_token(target: str) -> None:
    """Job code (drivers and training workers) runs in the Ray containers: none of them may hold a
    Kubernetes credential. The autoscaler alone gets one, at the path Ray's KubeRay node provider
    reads it from."""
    from ray.autoscaler._private.kuberay import node_provider

    docs = render(target)
    assert token_holders(docs) == ["autoscaler"], f"{target}: token holders {token_holders(docs)}"
    cluster = raycluster(docs)["spec"]
    mount = one_of(cluster["autoscalerOptions"]["volumeMounts"])
    assert str(PurePosixPath(mount["mountPath"]) / "token") == node_provider.IN_CLUSTER_TOKEN_PATH
    assert str(PurePosixPath(mount["mountPath"]) / "ca.crt") == node_provider.IN_CLUSTER_CA_CERT_PATH
    token = volume(cluster["headGroupSpec"]["template"]["spec"], mount["name"])
    paths = set()
    for source in token["projected"]["sources"]:
        ((kind, content),) = source.items()
        paths |= {content["path"]} if kind == "serviceAccountToken" else {i["path"] for i in content["items"]}
    assert {"token", "ca.crt", "namespace"} <= paths, f"{target}: the projected token lacks {paths}"


def one_of(items: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(items) == 1, items
    return items[0]


def test_token_check_can_fail() -> None:
    """The check sees the head's token automounted again, and a worker mounting the token volume."""
    docs = copy.deepcopy(render("deploy/base"))
    cluster = raycluster(docs)["spec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    del head["automountServiceAccountToken"]
    assert "RayCluster/hutch-ray head container ray-head" in token_holders(docs)
    head["automountServiceAccountToken"] = False
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    worker.setdefault("volumes", []).append(copy.deepcopy(volume(head, "autoscaler-token")))
    worker["containers"][0]["volumeMounts"].append({"name": "autoscaler-token", "mountPath": "/run/t"})
    assert "RayCluster/hutch-ray worker group cpu container ray-worker" in token_holders(docs)


@pytest.mark.parametrize("target", TARGETS)
def test_job_drivers_run_on_workers_not_on_the_head(target: str) -> None:
    """The control plane asks for driver resources (HUTCH_DRIVER_RESOURCES) that a worker group
    advertises and the head does not, so no job code runs beside the autoscaler."""
    docs = render(target)
    wanted = json.loads(control_plane_env(docs)["HUTCH_DRIVER_RESOURCES"])
    assert wanted, f"{target}: no driver resources: drivers land on the head"
    head, *workers = ray_pods(docs)
    assert not wanted.keys() & head.group.get("resources", {}).keys(), f"{target}: the head offers {wanted}"
    offering = [
        w.where
        for w in workers
        if all(float(w.group.get("resources", {}).get(k, 0)) >= v for k, v in wanted.items())
    ]
    assert offering, f"{target}: no worker group offers the driver resources {wanted}"


@pytest.mark.parametrize("target", TARGETS)
def test_labels(target: str) -> None:
    for obj in render(target):
        labels = obj["metadata"].get("labels", {})
        for key in COMMON_LABELS:
            assert key in labels, f"{target}: {ident(obj)} has no label {key}"
        assert labels["app.kubernetes.io/version"] == PROJECT_VERSION, f"{target}: {ident(obj)} version label"
        assert labels["app.kubernetes.io/name"] == labels["app.kubernetes.io/part-of"] == "hutch", ident(obj)
        if obj["kind"] not in SHARED_KINDS:
            component = labels.get("app.kubernetes.io/component")
            assert component in COMPONENTS, f"{target}: {ident(obj)} component label is {component!r}"
    docs = render(target)
    pods = [("control-plane", deployment(docs)["spec"]["template"]["metadata"]["labels"])]
    pods += [("ray", pod.labels) for pod in ray_pods(docs)]
    for component, labels in pods:
        assert labels.get("app.kubernetes.io/component") == component, f"{target}: pod labels {labels}"
        assert labels.get("app.kubernetes.io/name") == "hutch", f"{target}: pod labels {labels}"


# -- network policy ------------------------------------------------------------------------------------


class Pod(NamedTuple):
    """A pod (``namespace`` set) or an address outside the pod network (``namespace`` None)."""

    name: str
    namespace: str | None
    labels: dict[str, str]
    ports: dict[str, int]
    ip: str = "10.244.1.17"  # the pod network: kind's default 10.244.0.0/16
    namespace_labels: Mapping[str, str] = MappingProxyType({})


def address(name: str, ip: str) -> Pod:
    """Something that is not a pod: a node, the API server, a managed database, the internet."""
    return Pod(name, None, {}, {}, ip)


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        value = labels.get(key)
        outcome = {
            "In": value is not None and value in values,
            "NotIn": value is None or value not in values,
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }
        if not outcome[operator]:
            return False
    return True


def _inside(ip: str, cidr: str) -> bool:
    where, network = ipaddress.ip_address(ip), ipaddress.ip_network(cidr)
    return where.version == network.version and where in network


def _peer_admits(peer: dict[str, Any], other: Pod, policy_namespace: str) -> bool:
    """Whether a ``from``/``to`` entry of a policy in ``policy_namespace`` names ``other``."""
    if "ipBlock" in peer:  # addresses, pods' included (as Calico and most CNIs apply them)
        block = peer["ipBlock"]
        return _inside(other.ip, block["cidr"]) and not any(
            _inside(other.ip, c) for c in block.get("except", [])
        )
    if other.namespace is None:
        return False  # selectors name pods only
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": other.namespace, **other.namespace_labels}
        if not _matches(peer["namespaceSelector"], namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return _matches(peer.get("podSelector", {}), other.labels)


def _port_admits(entry: dict[str, Any], port: int, protocol: str, destination: Pod) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    if "port" not in entry:
        return True
    first = destination.ports.get(entry["port"], -1) if isinstance(entry["port"], str) else entry["port"]
    return first <= port <= entry.get("endPort", first)


def _policy_types(policy: dict[str, Any]) -> list[str]:
    """A policy's directions; unset: Ingress, and Egress when it has egress rules."""
    default = ["Ingress", "Egress"] if "egress" in policy["spec"] else ["Ingress"]
    return policy["spec"].get("policyTypes", default)


def _allowed(policies: list[dict[str, Any]], pod: Pod, other: Pod, destination: Pod, port: int,
             protocol: str, direction: str) -> bool:  # fmt: skip
    """Whether the policies selecting ``pod`` let it open (Egress) or accept (Ingress) this."""
    if pod.namespace is None:
        return True  # not a pod: no policy applies
    key, peers_key = direction.lower(), "to" if direction == "Egress" else "from"
    selecting = [
        p for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and _matches(p["spec"]["podSelector"], pod.labels)
        and direction in _policy_types(p)
    ]  # fmt: skip
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            peers, ports = rule.get(peers_key, []), rule.get("ports", [])
            if ports and not any(_port_admits(entry, port, protocol, destination) for entry in ports):
                continue
            if not peers or any(_peer_admits(peer, other, policy["metadata"]["namespace"]) for peer in peers):
                return True
    return False


def reachable(policies: list[dict[str, Any]], source: Pod, destination: Pod, port: int,
              protocol: str = "TCP") -> bool:  # fmt: skip
    """Whether Kubernetes NetworkPolicy semantics let ``source`` open a connection to
    ``destination`` on ``port``: the source's egress rules and the destination's ingress rules."""
    return _allowed(policies, source, destination, destination, port, protocol, "Egress") and _allowed(
        policies, destination, source, destination, port, protocol, "Ingress"
    )


def _pods(docs: tuple[dict[str, Any], ...]) -> tuple[Pod, Pod, list[Pod]]:
    """The control plane, the Ray head and a pod of each worker group, as NetworkPolicies see them."""

    def ports(container: dict[str, Any]) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}

    plane_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    plane = Pod(
        "the control plane", NAMESPACE, plane_labels, ports(control_plane_container(docs)), "10.244.1.2"
    )
    head, *workers = (
        Pod(p.where, NAMESPACE, p.labels, ports(p.ray_container), f"10.244.2.{i}")
        for i, p in enumerate(ray_pods(docs), 1)
    )
    assert workers, "no worker group"
    return plane, head, workers


METADATA = address("the cloud metadata address", "169.254.169.254")
METADATA_V6 = address("the cloud metadata address (IPv6)", "fd00:ec2::254")
INTERNET = address("a package index on the internet", "151.101.0.223")
API_SERVER = address("the Kubernetes API server", "172.18.0.2")
DATABASE = address("a managed Postgres in the VPC", "10.20.0.5")
NODE = address("a node's kubelet", "10.0.3.4")


@pytest.mark.parametrize("target", TARGETS)
def test_network_policy_lets_only_the_right_pods_in_and_out(target: str) -> None:
    docs = render(target)
    policies = find(docs, "NetworkPolicy")
    plane, head, workers = _pods(docs)
    stranger = Pod("another pod in the namespace", NAMESPACE, {"app": "stranger"}, {}, "10.244.3.9")
    outsider = Pod("a pod in another namespace", "default", {}, {"http": 8080}, "10.244.4.4")
    operator = Pod("the KubeRay operator", OPERATOR_NAMESPACE, OPERATOR_LABELS, {}, "10.244.5.5")
    prometheus = Pod("Prometheus", PROMETHEUS_NAMESPACE, PROMETHEUS_LABELS, {}, "10.244.6.6")
    grafana = Pod("Grafana", PROMETHEUS_NAMESPACE, {"app.kubernetes.io/name": "grafana"}, {}, "10.244.6.7")
    ingress = Pod("the ingress controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, {},
                  "10.244.7.7")  # fmt: skip
    client = Pod(
        "a CI runner in a labelled namespace", "ci", {}, {}, "10.244.8.8", {"hutch-api-client": "true"}
    )
    dns = Pod("CoreDNS", "kube-system", {"k8s-app": "kube-dns"}, {}, "10.244.0.3")
    expected = [
        (plane, head, DASHBOARD_PORT, True),
        (workers[0], head, DASHBOARD_PORT, True),
        (operator, head, DASHBOARD_PORT, False),
        (stranger, head, DASHBOARD_PORT, False),
        (outsider, head, DASHBOARD_PORT, False),
        (workers[-1], head, 6379, True),
        (plane, head, 6379, False),
        (stranger, head, 6379, False),
        (operator, head, 6379, False),
        (plane, head, 10001, False),
        (outsider, head, 10001, False),
        (ingress, plane, 8000, True),
        (client, plane, 8000, True),
        (prometheus, plane, 8000, True),
        (stranger, plane, 8000, False),
        (outsider, plane, 8000, False),
        (head, plane, 8000, False),
        (ingress, plane, 9000, False),
        (prometheus, head, METRICS_PORT, True),
        (prometheus, head, 44217, True),
        (prometheus, head, 44227, True),
        (prometheus, head, 6379, False),
        (prometheus, head, DASHBOARD_PORT, False),
        (stranger, head, METRICS_PORT, False),
        # out of the control plane: DNS, the head's job API and the database only
        (plane, dns, 53, True),
        (plane, DATABASE, 5432, True),
        (plane, workers[0], DASHBOARD_PORT, False),
        (plane, INTERNET, 443, False),
        (plane, API_SERVER, 443, False),
        (plane, METADATA, 80, False),
        (plane, outsider, 8080, False),
        # out of the head: the autoscaler's API server, the dashboard's Prometheus and Grafana
        (head, API_SERVER, 443, True),
        (head, API_SERVER, 6443, True),
        (head, prometheus, 9090, True),
        (head, grafana, 3000, True),
        (head, METADATA, 80, False),
        (head, DATABASE, 5432, False),
        (head, dns, 53, True),
    ]
    for worker in workers:
        expected += [
            (prometheus, worker, METRICS_PORT, True),
            (prometheus, worker, 10002, False),
            (outsider, worker, METRICS_PORT, False),
            (head, worker, 10002, True),
            (workers[0], worker, 43210, True),
            (plane, worker, 10002, False),
            (stranger, worker, 10002, False),
            (operator, worker, DASHBOARD_PORT, False),
            # out of a worker, where job code runs: DNS, the cluster, the internet; not the
            # metadata address, the API server, nodes, the database, other namespaces
            (worker, dns, 53, True),
            (worker, head, 6379, True),
            (worker, INTERNET, 443, True),
            (worker, METADATA, 80, False),
            (worker, METADATA_V6, 80, False),
            (worker, API_SERVER, 443, False),
            (worker, API_SERVER, 6443, False),
            (worker, NODE, 10250, False),
            (worker, DATABASE, 5432, False),
            (worker, outsider, 8080, False),
            (worker, plane, 8000, False),
            (worker, prometheus, 9090, False),
        ]
    wrong = [
        f"{source.name} -> {destination.name} port {port}: {'refused' if allowed else 'allowed'}"
        for source, destination, port, allowed in expected
        if reachable(policies, source, destination, port, "UDP" if port == 53 else "TCP") != allowed
    ]
    assert not wrong, f"{target}: NetworkPolicies get these wrong:\n" + "\n".join(wrong)


@pytest.mark.parametrize("target", TARGETS)
def test_no_ray_pod_reaches_the_metadata_address(target: str) -> None:
    """Job code runs in Ray pods: the node's cloud credentials (169.254.169.254) stay out of reach."""
    docs = render(target)
    policies = find(docs, "NetworkPolicy")
    _, head, workers = _pods(docs)
    for pod in (head, *workers):
        for port in (80, 443, 8080):
            for metadata in (METADATA, METADATA_V6):
                assert not reachable(policies, pod, metadata, port), (
                    f"{target}: {pod.name} -> {metadata.ip}:{port}"
                )


def test_network_policy_check_can_fail() -> None:
    """The check sees a rule gone missing (no policy of its own on the head: the control plane is
    shut out of the dashboard), a rule too many (an open port: a stranger gets in), and an egress
    rule that lets the metadata address through."""
    docs = render("deploy/base")
    policies = find(docs, "NetworkPolicy")
    plane, head, workers = _pods(docs)
    stranger = Pod("stranger", NAMESPACE, {}, {})
    assert reachable(policies, plane, head, DASHBOARD_PORT)
    assert not reachable(policies, stranger, head, DASHBOARD_PORT)
    without_head = [p for p in policies if p["metadata"]["name"] != "hutch-ray-job-api"]
    assert not reachable(without_head, plane, head, DASHBOARD_PORT)
    opened = copy.deepcopy(policies)
    one(tuple(opened), "NetworkPolicy", "hutch-ray-job-api")["spec"]["ingress"].append(
        {"ports": [{"port": 8265}]}
    )
    assert reachable(opened, stranger, head, DASHBOARD_PORT)
    assert not reachable(policies, workers[0], METADATA, 80)
    leaky = copy.deepcopy(policies)
    for rule in one(tuple(leaky), "NetworkPolicy", "hutch-ray")["spec"]["egress"]:
        for peer in rule.get("to", []):
            peer.get("ipBlock", {}).pop("except", None)
    assert reachable(leaky, workers[0], METADATA, 80)
    assert reachable(leaky, workers[0], API_SERVER, 443)


# -- deploy/README.md ----------------------------------------------------------------------------------


def readme_commands() -> Iterator[tuple[str, list[str]]]:
    """(line, words) of every simple command in the README's bash blocks: continuation lines
    joined, comments dropped, pipelines and lists split."""
    for block in _readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            words: list[str] = []
            for word in [*lexer, ";"]:
                if word in {";", "|", "&&", "||", "&"}:
                    if words:
                        yield line.strip(), words
                    words = []
                else:
                    words.append(word)


TAKES_VALUE = {"-n", "--namespace", "-o", "--name", "--version", "--for", "--timeout", "-k", "-f", "-l", "-c"}


def split_options(words: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Positional words and options (``--a b``, ``--a=b``, ``-n b``, flags) of a command line;
    everything after ``--`` is positional."""
    positional: list[str] = []
    options: dict[str, list[str]] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word == "--":
            positional += words[index:]
            break
        if word.startswith("-") and "=" in word:
            key, _, value = word.partition("=")
            options.setdefault(key, []).append(value)
        elif word in TAKES_VALUE and index + 1 < len(words):
            options.setdefault(word, []).append(words[index + 1])
            index += 1
        elif word.startswith("-"):
            options.setdefault(word, [])
        else:
            positional.append(word)
        index += 1
    return positional, options


def option(options: dict[str, list[str]], *names: str, default: str | None = None) -> str | None:
    for name in names:
        if options.get(name):
            return options[name][0]
    return default


KIND_NAMES = {"deployment": "Deployment", "deploy": "Deployment", "svc": "Service", "service": "Service",
              "raycluster": "RayCluster", "secret": "Secret", "pvc": "PersistentVolumeClaim"}  # fmt: skip


EACH_WORKER_POD = "pod/<each Ray worker pod>"  # what `xargs -I{}` stands for after `get pods -o name`


class ReadmeCheck:
    """Walks the README's commands in order, as a newcomer would run them, and notes every one
    that does not match the manifests (or is not a command these tests know how to check)."""

    def __init__(self, routes: Routes) -> None:
        from api.cli import app as cli

        self.routes = routes
        self.targets = {t: render(t) for t in ("deploy/overlays/dev", "deploy/overlays/gpu")}
        self.dev = self.targets["deploy/overlays/dev"]
        cluster = raycluster(self.dev)
        self.head_service = f"{cluster['metadata']['name']}-head-svc"
        self.head_ports = {p["containerPort"] for p in ray_pods(self.dev)[0].ray_container.get("ports", [])}
        self.storage = control_plane_env(self.dev)["HUTCH_STORAGE_PATH"]
        self.cli_commands = {c.name or c.callback.__name__ for c in cli.registered_commands}
        self.cli_commands |= {group.name for group in cli.registered_groups}  # `hutch db upgrade`
        self.secrets: list[tuple[str, set[str]]] = []  # created, in order: (name, keys)
        self.environment: dict[str, str] = {}  # exported so far
        self.forwarded: dict[str, int] = {}  # Service -> local port
        self.helm_releases: list[tuple[str, str]] = []  # (release, namespace), installed so far
        self.kind_cluster: str | None = None
        self.loaded: dict[str, set[str]] = {"kind": set(), "minikube": set()}
        self.problems: list[str] = []
        self.line = ""  # the command being checked, for the problems it has

    def run(self) -> list[str]:
        for line, words in readme_commands():
            env = dict(self.environment)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                name, _, value = words.pop(0).partition("=")
                env[name] = value
            self.line = line
            program, args = words[0], words[1:]
            if program == "export":
                self.environment.update(dict(word.partition("=")[::2] for word in args))
            elif program in ("kubectl", "helm", "hutch", "kind", "minikube", "curl", "pip", "prometheus"):
                getattr(self, program)(args, env)
            elif program == "xargs" and args[:2] == ["-I{}", "kubectl"]:  # after `kubectl get pods -o name`
                self.kubectl([EACH_WORKER_POD if a == "{}" else a for a in args[2:]], env)
            elif program != "base64":
                self.problem(f"{program} is not a command the tests check")
        self.finish()
        return self.problems

    def problem(self, message: str) -> None:
        self.problems.append(f"{self.line}\n    {message}")

    def exists(self, reference: str) -> bool:
        kind, _, name = reference.partition("/")
        kind = KIND_NAMES.get(kind, kind)
        if (kind == "Service" and name == self.head_service) or reference == EACH_WORKER_POD:
            return True
        if kind == "Secret":
            return name in {n for n, _ in self.secrets}
        return any(
            o["kind"] == kind and o["metadata"]["name"] == name for d in self.targets.values() for o in d
        )

    def kubectl(self, args: list[str], env: dict[str, str]) -> None:
        positional, options = split_options(args)
        verb = positional[:2] if positional[:1] in (["create"], ["rollout"]) else positional[:1]
        rest = positional[len(verb) :]
        if verb == ["apply"] and option(options, "-f"):
            path = ROOT / option(options, "-f", default="")
            namespace = yaml.safe_load(path.read_text()) if path.is_file() else {}
            if path != DEPLOY / "namespace.yaml" or namespace.get("metadata", {}).get("name") != NAMESPACE:
                self.problem(f"applies {path.name}, not deploy/namespace.yaml (the namespace {NAMESPACE})")
            return
        if verb in (["apply"], ["delete"], ["kustomize"]) and rest[:1] not in (["secret"], ["pods"]):
            path = option(options, "-k") or (rest or [""])[0]
            if path == "my-cluster":
                render(README_EXAMPLE)
            elif (ROOT / path / "kustomization.yaml").exists():
                render(path)
            else:
                self.problem(f"{path!r} is no kustomization of this repository or of the README")
            return
        if verb == ["create", "namespace"]:
            if rest != [NAMESPACE]:
                self.problem(f"the manifests install into the namespace {NAMESPACE}")
            return
        if verb == ["port-forward"] and option(options, "-n", "--namespace") == PROMETHEUS_NAMESPACE:
            self.grafana_forward(rest)
            return
        if option(options, "-n", "--namespace") != NAMESPACE:
            self.problem(f"runs outside the namespace {NAMESPACE} (-n {NAMESPACE})")
        if verb == ["delete"] and rest[:1] == ["secret"]:
            if not self.exists(f"secret/{rest[1]}"):
                self.problem(f"deletes Secret {rest[1]}, which no command above created")
            self.secrets = [(name, keys) for name, keys in self.secrets if name != rest[1]]
        elif verb in (["delete"], ["get"]) and rest == ["pods"] and option(options, "-l"):
            selector = dict(pair.partition("=")[::2] for pair in option(options, "-l", default="").split(","))
            if not any(selector.items() <= pod.labels.items() for pod in ray_pods(self.dev)):
                self.problem(f"-l {option(options, '-l')} selects no Ray pod")
        elif verb == ["create", "secret"]:
            self.secrets.append((rest[1], {v.partition("=")[0] for v in options.get("--from-literal", [])}))
            if rest[0] != "generic":
                self.problem("create generic Secrets (key=value pairs)")
        elif verb == ["get"] and rest[:1] == ["secret"]:
            key = re.fullmatch(r"jsonpath=\{\.data\.([\w.-]+)\}", option(options, "-o", default=""))
            keys = {k for name, created in self.secrets if name == rest[1] for k in created}
            if not key or key.group(1) not in keys:
                self.problem(f"Secret {rest[1]} has no such key (it has {sorted(keys)})")
        elif verb == ["get"] and rest == ["pods"]:
            pass
        elif verb in (["wait"], ["logs"], ["rollout", "status"], ["rollout", "restart"], ["exec"]):
            if not rest or not self.exists(rest[0]):
                self.problem(f"{rest[:1]} is not an object the manifests make")
            condition = option(options, "--for", default="").partition("condition=")[2]
            if verb == ["wait"] and condition not in RAYCLUSTER_CONDITIONS:
                self.problem(f"KubeRay sets no condition {condition!r}")
            command = rest[rest.index("--") + 1 :] if "--" in rest else []
            checkpoints = f"{self.storage}/checkpoints"
            if verb == ["exec"] and rest[0] == EACH_WORKER_POD:
                worker = ray_pods(self.dev)[1].ray_container
                hook = worker.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
                if command != hook or option(options, "-c") != worker["name"]:
                    self.problem(f"not the worker pods' preStop hook, {hook}, in container {worker['name']}")
            elif verb == ["exec"] and (
                command[:1] != ["ls"] or not all(p == checkpoints for p in command[1:])
            ):
                self.problem(f"not a look at the checkpoints, {checkpoints}")
        elif verb == ["port-forward"]:
            kind, _, name = rest[0].partition("/")
            local, _, remote = rest[1].partition(":")
            if name == self.head_service:
                offered = self.head_ports
            else:
                offered = {p["port"] for s in find(self.dev, "Service", name) for p in s["spec"]["ports"]}
            if KIND_NAMES.get(kind) != "Service" or int(remote) not in offered:
                self.problem(f"Service {name} offers ports {sorted(offered)}")
            self.forwarded[name] = int(local)
        else:
            self.problem("a kubectl command the tests do not check")

    def grafana_forward(self, rest: list[str]) -> None:
        """kube-prometheus-stack's Grafana, on the local port the Ray head's iframe host names."""
        release = one(self.targets["deploy/overlays/gpu"], "PodMonitor")["metadata"]["labels"]["release"]
        if (release, PROMETHEUS_NAMESPACE) not in self.helm_releases:
            self.problem(f"no kube-prometheus-stack release {release!r} was installed above")
        local, _, remote = rest[1].partition(":")
        if rest[0] != f"svc/{release}-grafana" or remote != "80":
            self.problem(f"the chart's Grafana Service is svc/{release}-grafana, port 80")
        iframe = {e["name"]: e.get("value") for e in ray_pods(self.dev)[0].ray_container.get("env", [])}
        if iframe.get("RAY_GRAFANA_IFRAME_HOST") != f"http://127.0.0.1:{local}":
            self.problem(f"the Ray head's RAY_GRAFANA_IFRAME_HOST is {iframe.get('RAY_GRAFANA_IFRAME_HOST')}")

    def prometheus(self, args: list[str], env: dict[str, str]) -> None:
        _, options = split_options(args)
        config = option(options, "--config.file", default="")
        if not (ROOT / config).is_file() or not config.startswith("deploy/monitoring/"):
            self.problem(f"{config!r} is not the plain Prometheus configuration of deploy/monitoring")

    def hutch(self, args: list[str], env: dict[str, str]) -> None:
        from service.admission import ClusterCapacity, Unschedulable, check_fits
        from trainer.spec import load_spec

        positional, _ = split_options(args)
        if not positional or positional[0] not in self.cli_commands - {"serve"}:
            self.problem(f"`hutch {positional[:1]}` is not a client command of the CLI")
            return
        api = f"http://127.0.0.1:{self.forwarded.get('hutch')}"
        if env.get("HUTCH_URL") != api or "HUTCH_TOKEN" not in env:
            self.problem(f"needs HUTCH_URL={api} (the port-forward) and HUTCH_TOKEN")
        for spec_file in (w for w in positional[1:] if w.endswith((".yaml", ".yml", ".json"))):
            spec = load_spec(ROOT / spec_file)
            overlay = "gpu" if spec.scaling.use_gpu else "dev"  # a GPU job is for the gpu overlay
            docs = self.targets[f"deploy/overlays/{overlay}"]
            settings = control_plane_env(docs)
            limits = float(settings["HUTCH_MAX_CLUSTER_CPUS"]), float(settings["HUTCH_MAX_CLUSTER_GPUS"])
            per_pod = [ray_resources(pod) for pod in ray_pods(docs)[1:]]
            try:
                check_fits(spec, ClusterCapacity({}, {}), *limits)
            except Unschedulable as error:
                self.problem(f"the {overlay} overlay would refuse {spec_file}: {error}")
            scaling = spec.scaling
            if not any(
                scaling.cpus_per_worker <= cpus and scaling.gpus_per_worker <= gpus for cpus, gpus in per_pod
            ):
                self.problem(f"one worker of {spec_file} fits no {overlay} worker pod ({per_pod})")

    def helm(self, args: list[str], env: dict[str, str]) -> None:
        positional, options = split_options(args)
        namespace = option(options, "-n", "--namespace", default="default")
        if positional[:2] == ["repo", "add"]:
            known = (["kuberay", KUBERAY_HELM_REPO], ["prometheus-community", PROMETHEUS_HELM_REPO])
            if positional[2:] not in known:
                self.problem(f"KubeRay's chart repository is kuberay, {KUBERAY_HELM_REPO}")
        elif positional[:1] == ["install"] and positional[2:3] == [PROMETHEUS_CHART]:
            release = one(self.targets["deploy/overlays/gpu"], "PodMonitor")["metadata"]["labels"]["release"]
            if (positional[1], namespace) != (release, PROMETHEUS_NAMESPACE):
                self.problem(f"the monitors and the NetworkPolicy expect {release} in {PROMETHEUS_NAMESPACE}")
            self.helm_releases.append((positional[1], namespace))
        elif positional[:1] == ["install"]:
            version = option(options, "--version", default="0")
            validated = SCHEMAS / "README.md"
            crd = (
                re.search(r"KubeRay v(\d+\.\d+\.\d+)", validated.read_text()) if validated.exists() else None
            )
            if _version(version) < KUBERAY_MIN or (crd and version != crd.group(1)):
                self.problem(f"KubeRay {version}: needs 1.7.0 or newer, the version of the validated CRDs")
            if positional[2:3] != ["kuberay/kuberay-operator"]:
                self.problem("not the kuberay-operator chart")
            self.helm_releases.append((positional[1], namespace))
            if namespace != OPERATOR_NAMESPACE:
                self.problem(f"the operator goes into {OPERATOR_NAMESPACE}, as the README says throughout")
        elif positional[:1] == ["uninstall"]:
            if (positional[1], namespace) not in self.helm_releases:
                self.problem(f"not a release installed above, {self.helm_releases}")
        elif positional != ["repo", "update"]:
            self.problem("a helm command the tests do not check")

    def kind(self, args: list[str], env: dict[str, str]) -> None:
        positional, options = split_options(args)
        name = option(options, "--name", default="kind")
        if positional[:2] == ["create", "cluster"]:
            self.kind_cluster = name
        elif positional[:2] == ["load", "docker-image"] and name == self.kind_cluster:
            self.loaded["kind"] |= set(positional[2:])
        else:
            self.problem("a kind command the tests do not check")

    def minikube(self, args: list[str], env: dict[str, str]) -> None:
        if args[:2] != ["image", "load"]:
            self.problem("a minikube command the tests do not check")
        self.loaded["minikube"] |= set(args[2:])

    def curl(self, args: list[str], env: dict[str, str]) -> None:
        url = urlsplit(next((w for w in args if w.startswith("http")), ""))
        if url.port != self.forwarded.get("hutch") or not self.routes.serves(url.path):
            self.problem(f"{url.path} on port {url.port} is not an open route of the forwarded API")

    def pip(self, args: list[str], env: dict[str, str]) -> None:
        if args != ["install", "-e", "."] or "hutch" not in _project().get("scripts", {}):
            self.problem("not the install of this repository's hutch CLI")

    def finish(self) -> None:
        self.line = "(after the last command)"
        images = {c["image"] for _, spec in all_pod_specs(self.dev) for c in spec["containers"]}
        for tool, loaded in self.loaded.items():
            if loaded and loaded != images:
                self.problem(f"{tool} loads {sorted(loaded)}; the dev overlay runs {sorted(images)}")
        for target, docs in self.targets.items():
            wanted = {v for v in control_plane_env(docs).values() if isinstance(v, SecretKey)}
            wanted |= set(secret_files(docs).values())
            for name in {ref.name for ref in wanted}:
                keys = {ref.key for ref in wanted if ref.name == name}
                if keys not in [created for secret, created in self.secrets if secret == name]:
                    self.problem(f"{target} needs Secret {name} with {sorted(keys)}: no command creates it")
        for command in set(re.findall(r"`hutch ([a-z][a-z-]*)", README.read_text())):
            if command not in self.cli_commands:
                self.problem(f"the README mentions `hutch {command}`, which the CLI does not have")


def test_readme_commands_match_the_manifests(routes: Routes) -> None:
    problems = ReadmeCheck(routes).run()
    assert not problems, "deploy/README.md and the manifests disagree:\n" + "\n".join(problems)


def test_readme_check_can_fail(routes: Routes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A README whose commands drifted from the manifests is caught: each edit below, made to the
    real README, brings a problem that names it."""
    original = _readme_blocks
    real = original("bash")
    drifts = [
        ("kubectl apply -k deploy/overlays/dev", "kubectl apply -k deploy/overlays/prod", "no kustomization"),
        ("-n hutch --from-literal=api-tokens=", "-n hutch --from-literal=api-token=", "needs Secret"),
        ("svc/hutch 8000:8000", "svc/hutch 8000:8080", "offers ports"),
        ("deployment/hutch-control-plane --timeout", "deployment/hutch --timeout", "not an object"),
        ("--version 1.7.0", "--version 1.5.1", "needs 1.7.0"),
        ("--namespace kuberay-system --create", "--namespace ray-system --create", "the operator goes into"),
        (
            "HUTCH_URL=http://127.0.0.1:8000 HUTCH_TOKEN",
            "HUTCH_URL=http://127.0.0.1:8001 HUTCH_TOKEN",
            "HUTCH_URL",
        ),
        ("127.0.0.1:8000/readyz", "127.0.0.1:8000/ready", "not an open route"),
        (
            "hutch localhost/hutch/control-plane:0.1.0",
            "hutch localhost/hutch/control-plane:0.0.9",
            "kind loads",
        ),
        ("condition=HeadPodReady", "condition=Ready", "no condition"),
        ("helm repo update", "docker build .", "not a command the tests check"),
    ]
    for before, after, expected in drifts:
        assert any(before in block for block in real), f"the README no longer has {before!r}"
        drifted = [block.replace(before, after) for block in real]
        monkeypatch.setattr(
            sys.modules[__name__],
            "_readme_blocks",
            lambda language, d=drifted: d if language == "bash" else original(language),
        )
        problems = ReadmeCheck(routes).run()
        assert any(expected in p for p in problems), f"{before!r} -> {after!r} was not caught: {problems}"


def test_readme_objects_validate() -> None:
    """The README's YAML sketches (an Ingress, a StorageClass) are valid objects; the Ingress has
    TLS, routes the API (/v1) alone (never /metrics, /docs, /openapi.json) to a real port."""
    versions = _core_versions()
    service = one(render("deploy/base"), "Service", "hutch")
    ports = {p.get("name") for p in service["spec"]["ports"]} | {p["port"] for p in service["spec"]["ports"]}
    objects = [yaml.safe_load(block) for block in _readme_blocks("yaml")]
    objects = [obj for obj in objects if obj.get("kind") != "Kustomization"]
    assert objects, "deploy/README.md shows no Ingress sketch"
    for obj in objects:
        problem = _validate_core(obj, versions[-1])
        assert problem is None, f"deploy/README.md: {problem}"
        if obj["kind"] == "Ingress":
            assert obj["spec"].get("tls"), "deploy/README.md: the Ingress sends bearer tokens in clear"
        for rule in obj.get("spec", {}).get("rules", []):
            for path in rule["http"]["paths"]:
                assert path["path"] == "/v1", (
                    f"deploy/README.md: the Ingress routes {path['path']}, not only /v1"
                )
                backend = path["backend"]["service"]
                port = backend["port"].get("name", backend["port"].get("number"))
                assert backend["name"] == "hutch" and port in ports, (
                    f"deploy/README.md: {ident(obj)} routes to {backend}, not to Service/hutch"
                )
