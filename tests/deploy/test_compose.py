"""deploy/compose.yaml, checked by parsing (no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from guard.control.config import Config, load_config
from tests.deploy.paths import DEPLOY, REPO

COMPOSE = DEPLOY / "compose.yaml"


def _mounts(service: dict) -> dict[str, Path]:
    """container path -> host path (resolved against deploy/, as compose does)."""
    out = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith("."):
            out[container] = (DEPLOY / host).resolve()
    return out


def _flag(command: list[str], name: str) -> str:
    return next(a for a in command if a.startswith(f"{name}=")).split("=", 1)[1]


def test_compose_wiring() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"models", "tf-serving", "guard", "prometheus", "grafana"}

    guard = services["guard"]
    assert guard["build"]["target"] == "runtime"
    assert services["models"]["build"]["target"] == "local-backend"
    for service in services.values():
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()

    # The guard's config: examples/guard.yaml mounted where GUARD_CONFIG points.
    mounts = _mounts(guard)
    config_file = mounts["/etc/guard"] / "guard.yaml"
    cfg = load_config(config_file)
    defaults = Config()
    published = {int(p.split(":")[1]) for p in guard["ports"]}
    assert published == {
        int(cfg.listen.rsplit(":", 1)[1]),
        int(cfg.rest_listen.rsplit(":", 1)[1]),
        int(cfg.metrics_listen.rsplit(":", 1)[1]),
    }
    assert {p.split(":")[0] for p in guard["ports"]} == {"8500", "8501", "9102"}
    assert (cfg.listen, cfg.rest_listen) == (defaults.listen, defaults.rest_listen)

    # The guard's upstreams are TF Serving's --port and --rest_api_port, published nowhere.
    tfs = services["tf-serving"]
    assert re.fullmatch(r"tensorflow/serving:\d+\.\d+\.\d+", tfs["image"])
    tfs_port = _flag(tfs["command"], "--port")
    tfs_rest_port = _flag(tfs["command"], "--rest_api_port")
    assert guard["environment"]["GUARD_UPSTREAM"] == f"tf-serving:{tfs_port}"
    assert guard["environment"]["GUARD_REST_UPSTREAM"] == f"tf-serving:{tfs_rest_port}"
    assert tfs_rest_port == "8511" and "ports" not in tfs

    # TF Serving serves exactly the models the guard has rules for.
    models_config = _mounts(tfs)["/config/models.config"].read_text()
    served = set(re.findall(r'name: "([^"]+)"', models_config))
    assert served == cfg.model_names()

    # Prometheus scrapes the guard's metrics port and loads the shipped rules.
    prom_mounts = _mounts(services["prometheus"])
    prom_config = yaml.safe_load(prom_mounts["/etc/prometheus/prometheus.yml"].read_text())
    targets = prom_config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"guard:{cfg.metrics_listen.rsplit(':', 1)[1]}"]
    assert prom_config["rule_files"] == ["/etc/prometheus/guard-rules.yaml"]
    assert prom_mounts["/etc/prometheus/guard-rules.yaml"] == (
        DEPLOY / "prometheus" / "guard-rules.yaml"
    )

    # Grafana: the provisioned dashboard directory holds the committed dashboard.
    graf_mounts = _mounts(services["grafana"])
    provisioning = graf_mounts["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "guard.yaml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert graf_mounts[f"{dash_dir}/guard-dashboard.json"] == (
        DEPLOY / "grafana" / "guard-dashboard.json"
    )
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert (REPO / "examples" / "guard.yaml").is_file()
