"""Kubernetes manifests: rendered, schema-validated, and consistent with the guard's config.

Rendering uses deploy/k8s/render.py (the subset of kustomize the manifests use); where
kubectl exists its `kubectl kustomize` output must be identical.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from guard.control.config import Config, load_config
from tests.deploy.paths import DEPLOY, REPO

K8S_VERSION = "1.32"
KUSTOMIZATIONS = [DEPLOY / "k8s" / "base", DEPLOY / "k8s" / "overlays" / "cpu"]
IDS = ["base", "overlay-cpu"]

# prometheus-operator's CRDs are not in kubernetes-validate: validate against the field
# names of monitoring.coreos.com/v1 (the subset these manifests may use; unknown fields fail).
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(ms|s|m|h|d|w|y))+)$"}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector"],
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": {"type": "string"},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string"},
                                "interval": _DURATION,
                                "limit": {"type": "integer"},
                                "partial_response_strategy": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [
                                            {"required": ["record"]},
                                            {"required": ["alert"]},
                                        ],
                                        "properties": {
                                            "record": {"type": "string"},
                                            "alert": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": {"type": "object"},
                                            "annotations": {"type": "object"},
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                            },
                            "additionalProperties": False,
                        },
                    }
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def _renderers(k8s_renderer: ModuleType) -> dict[str, Any]:
    renderers: dict[str, Any] = {"python": k8s_renderer.render}
    kubectl = shutil.which("kubectl")
    if kubectl:

        def kubectl_render(path: Path) -> list[dict[str, Any]]:
            out = subprocess.run(
                [kubectl, "kustomize", str(path)],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
            return [d for d in yaml.safe_load_all(out) if d]

        renderers["kubectl"] = kubectl_render
    return renderers


def _by_key(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.fixture(scope="module")
def rendered(k8s_renderer: ModuleType) -> dict[str, list[dict[str, Any]]]:
    return {name: k8s_renderer.render(path) for name, path in zip(IDS, KUSTOMIZATIONS, strict=True)}


def _mib(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    return int(quantity[:-2]) * units[quantity[-2:]]


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=IDS)
def test_every_renderer_gives_valid_objects(path: Path, k8s_renderer: ModuleType) -> None:
    outputs = {name: fn(path) for name, fn in _renderers(k8s_renderer).items()}
    for name, objects in outputs.items():
        kinds = sorted(o["kind"] for o in objects)
        assert kinds == sorted(
            ["ConfigMap", "Deployment", "NetworkPolicy", "PodMonitor", "PrometheusRule", "Service"]
        ), name
        for obj in objects:
            if obj["kind"] in CRD_SCHEMAS:
                jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
            else:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    if "kubectl" in outputs:
        assert _by_key(outputs["python"]) == _by_key(outputs["kubectl"])


def test_validation_rejects_a_broken_deployment(rendered: dict[str, list]) -> None:
    """Control: the schema check is strict (a misspelt probe field fails)."""
    deployment = yaml.safe_load(yaml.safe_dump(_one(rendered["base"], "Deployment")))
    guard = _container(deployment, "guard")
    guard["readinessProbe"]["grpcc"] = guard["readinessProbe"].pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    rule = yaml.safe_load(yaml.safe_dump(_one(rendered["base"], "PrometheusRule")))
    rule["spec"]["groups"][1]["rules"][0]["fore"] = "5m"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, CRD_SCHEMAS["PrometheusRule"])


_PROBE_TIMING = {
    "periodSeconds",
    "timeoutSeconds",
    "failureThreshold",
    "successThreshold",
    "initialDelaySeconds",
}


def _load_guard_config(text: str, tmp_path: Path) -> Config:
    """Load config text exactly as `guard serve --config` would (the guard's YAML rules)."""
    path = tmp_path / "guard.yaml"
    path.write_text(text)
    return load_config(path)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _flag(args: list[str], name: str) -> int:
    """The integer value of ``--name=VALUE`` in a container's args."""
    return int(next(a for a in args if a.startswith(f"{name}=")).split("=", 1)[1])


@pytest.mark.parametrize("variant", IDS)
def test_sidecar_agrees_with_guard_config(
    variant: str, rendered: dict[str, list], tmp_path: Path
) -> None:
    objects = rendered[variant]
    deployment = _one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    guard = _container(deployment, "guard")
    tfs = _container(deployment, "tensorflow-serving")

    # The config file path: args --config, the mounted ConfigMap and its key.
    args = guard["args"]
    config_path = Path(args[args.index("--config") + 1])
    mount = next(m for m in guard["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = next(
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]
    )
    cfg = _load_guard_config(configmap["data"][config_path.name], tmp_path)
    defaults = Config()
    assert config_path == Path("/etc/guard/guard.yaml")

    # Ports: the config's listen/rest_listen/metrics_listen, the container ports, the probes.
    ports = {p["name"]: p["containerPort"] for p in guard["ports"]}
    assert set(ports) == {"grpc", "rest", "metrics"}
    assert ports["grpc"] == _port(cfg.listen) == _port(defaults.listen) == 8500
    assert ports["rest"] == _port(cfg.rest_listen) == _port(defaults.rest_listen) == 8501
    assert ports["metrics"] == _port(cfg.metrics_listen) == _port(defaults.metrics_listen)
    # Startup and readiness use the gRPC health service (overall status "": SERVING only
    # while TF Serving answers); liveness checks the guard's own gRPC port.
    # REST adds no probe: both listeners share one process and one drain.
    for probe in ("startupProbe", "readinessProbe"):
        assert set(guard[probe]) - {"grpc"} <= _PROBE_TIMING, probe
        assert guard[probe]["grpc"]["port"] == ports["grpc"], probe
        assert guard[probe]["grpc"].get("service", "") == "", probe
    assert ports[guard["livenessProbe"]["tcpSocket"]["port"]] == ports["grpc"]

    # The upstreams are TF Serving in the same pod, on the ports it was told to use:
    # gRPC and REST both, on ports the guard does not listen on.
    tfs_port = _flag(tfs["args"], "--port")
    tfs_rest_port = _flag(tfs["args"], "--rest_api_port")
    assert cfg.upstream == f"127.0.0.1:{tfs_port}"
    assert cfg.rest_upstream == f"127.0.0.1:{tfs_rest_port}" == "127.0.0.1:8511"
    tfs_ports = {p["name"]: p["containerPort"] for p in tfs["ports"]}
    assert tfs_ports == {"tfs-grpc": tfs_port, "tfs-rest": tfs_rest_port}
    assert not set(tfs_ports.values()) & set(ports.values())

    # The Service exposes the guard only, on TF Serving's own port numbers:
    # 8500 -> grpc, 8501 -> rest, metrics -> metrics, nothing else.
    service = _one(objects, "Service")
    exposed = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert exposed == {8500: "grpc", 8501: "rest", ports["metrics"]: "metrics"}
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    policy = _one(objects, "NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {ports["grpc"], ports["rest"], ports["metrics"]}
    assert not allowed & set(tfs_ports.values())

    # The PodMonitor scrapes the named metrics port.
    monitor = _one(objects, "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"

    # Shutdown drains: guard preStop + shutdown_grace_s fits in TF Serving's preStop,
    # which fits in terminationGracePeriodSeconds.
    guard_sleep = int(guard["lifecycle"]["preStop"]["exec"]["command"][-1])
    tfs_sleep = int(tfs["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert guard_sleep + cfg.shutdown_grace_s < tfs_sleep
    assert tfs_sleep + 10 <= pod["terminationGracePeriodSeconds"]

    # Footprint and hardening.
    # The memory limit holds what the config lets clients make the guard hold
    # (docs/deploy.md, "Memory"): the idle process, the bytes in flight twice
    # (held, and a working copy while guarded), two requests' decompression.
    resources = guard["resources"]
    assert _mib(resources["requests"]["memory"]) >= 64
    needed = 64 + 2 * cfg.max_inflight_mb + 2 * cfg.max_request_mb
    assert _mib(resources["limits"]["memory"]) >= needed
    # The memory ceiling acts above what the config allows and under the limit,
    # with room for a flood's growth between two readings.
    assert needed < cfg.max_memory_mb <= _mib(resources["limits"]["memory"]) - 32
    security = guard["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_gpu_base_and_cpu_overlay(rendered: dict[str, list]) -> None:
    base = _container(_one(rendered["base"], "Deployment"), "tensorflow-serving")
    image, tag = base["image"].rsplit(":", 1)
    assert image == "tensorflow/serving" and tag.endswith("-gpu") and tag[0].isdigit()
    assert base["resources"]["limits"]["nvidia.com/gpu"] == 1

    cpu_deployment = _one(rendered["overlay-cpu"], "Deployment")
    cpu = _container(cpu_deployment, "tensorflow-serving")
    assert cpu["image"] == f"tensorflow/serving:{tag.removesuffix('-gpu')}"
    assert "nvidia.com" not in yaml.safe_dump(cpu_deployment)


def test_configmap_rules_are_valid_guard_config(rendered: dict[str, list], tmp_path: Path) -> None:
    configmap = _one(rendered["base"], "ConfigMap")
    source = (DEPLOY / "k8s" / "base" / "guard.yaml").read_text()
    assert configmap["data"] == {"guard.yaml": source}
    cfg = _load_guard_config(source, tmp_path)
    assert cfg.models, "the example config carries at least one rule"
    assert cfg.models[0].outputs[0].labels == ("NO", "YES")


def test_renderer_refuses_unsupported_fields(k8s_renderer: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas: []\n")
    with pytest.raises(k8s_renderer.RenderError, match="replicas"):
        k8s_renderer.render(tmp_path)


def test_kustomization_files_parse() -> None:
    for path in KUSTOMIZATIONS:
        data = yaml.safe_load((path / "kustomization.yaml").read_text())
        assert data["kind"] == "Kustomization"
    assert (REPO / "deploy" / "k8s" / "render.py").is_file()
