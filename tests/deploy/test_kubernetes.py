"""deploy/kubernetes/ against the Kubernetes schemas (kubernetes-validate, strict), and consistent
with itself, the image and the app: selectors match labels, ports and probe paths exist, the grace
period covers the drain, the settings are valid settings, the models file is examples/models.yaml,
and the autoscaler's load metric is what prometheus-adapter's rule computes from a live server's
/metrics (Debian's Prometheus evaluates the rule's query)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.api.settings import Settings
from tests.conftest import ROOT, LiveServer
from tests.deploy.support import (
    KUBERNETES,
    load_yaml_documents,
    prometheus_binary,
    start_prometheus,
    venv_tool,
    wait_for,
)

# As in test_compose: two drains of TAPESERVE_SHUTDOWN_GRACE_S, then ~11 s to stop the workers.
_WORKER_STOP_S = 11.0
LABELS = {"app.kubernetes.io/name": "tapeserve", "app.kubernetes.io/component": "api"}
# prometheus-adapter's configuration, applied in the adapter's namespace (not the app's).
ADAPTER = KUBERNETES / "metrics-adapter"


def _validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_tool("kubernetes-validate")), "--strict", "--quiet", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in load_yaml_documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


def _container(resources: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    containers = resources["Deployment", "tapeserve"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_manifests_match_the_kubernetes_schemas() -> None:
    result = _validate(*sorted(KUBERNETES.glob("*.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_manifest(tmp_path: Path) -> None:
    # The control: a wrong type and an unknown field (strict) both fail.
    bad = tmp_path / "bad.yaml"
    doc = load_yaml_documents(KUBERNETES / "deployment.yaml")[0]
    doc["spec"]["replicas"] = "two"
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    bad.write_text(yaml.safe_dump(doc))
    result = _validate(bad)
    assert result.returncode != 0
    assert "replicas" in result.stdout + result.stderr


def test_every_kind_is_there_and_labelled(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    kinds = {kind for kind, _ in resources}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"}
    for doc in resources.values():
        assert doc["metadata"]["labels"] == LABELS, doc["metadata"]
        assert "namespace" not in doc["metadata"], "the namespace is chosen at apply time (-n)"


def test_selectors_match_the_pods(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = resources["Deployment", "tapeserve"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        resources["Service", "tapeserve"]["spec"]["selector"],
        resources["PodDisruptionBudget", "tapeserve"]["spec"]["selector"]["matchLabels"],
        deployment["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"][
            "matchLabels"
        ],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items(), (selector, pod_labels)
    target = resources["HorizontalPodAutoscaler", "tapeserve"]["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "tapeserve")


def test_ports_agree(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = _container(resources)
    (port,) = container["ports"]
    assert port["containerPort"] == 8000
    # The image's command is the container's: the port it listens on is the one declared.
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert cmd, "the Dockerfile has an exec-form CMD"
    command = json.loads(cmd[1])
    assert container["args"] == command
    assert command[command.index("--port") + 1] == str(port["containerPort"])
    (service_port,) = resources["Service", "tapeserve"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    annotations = resources["Deployment", "tapeserve"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])


def test_probes_use_the_apps_health_routes(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = _container(resources)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    openapi = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    annotations = resources["Deployment", "tapeserve"]["spec"]["template"]["metadata"]["annotations"]
    for path in (
        container["livenessProbe"]["httpGet"]["path"],
        container["readinessProbe"]["httpGet"]["path"],
        container["startupProbe"]["httpGet"]["path"],
        annotations["prometheus.io/path"],
    ):
        assert "get" in openapi["paths"].get(path, {}), f"{path} is not a GET route of the app"


def test_grace_period_covers_prestop_and_the_drain(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = resources["Deployment", "tapeserve"]["spec"]["template"]["spec"]
    command = _container(resources)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = float(resources["ConfigMap", "tapeserve-settings"]["data"]["TAPESERVE_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + 2 * grace + _WORKER_STOP_S


def test_gpu_and_security(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = _container(resources)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-gpu")
    pod = resources["Deployment", "tapeserve"]["spec"]["template"]["spec"]
    uid = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert uid and pod["securityContext"]["runAsUser"] == int(uid[1])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_disruption_budget_and_autoscaler_keep_a_replica(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    hpa = resources["HorizontalPodAutoscaler", "tapeserve"]["spec"]
    pdb = resources["PodDisruptionBudget", "tapeserve"]["spec"]
    deployment = resources["Deployment", "tapeserve"]["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"]
    assert deployment["replicas"] == hpa["minReplicas"]
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] <= pdb["maxUnavailable"]
    # CPU utilisation is only computed against a CPU request.
    assert "cpu" in _container(resources)["resources"]["requests"]


def test_settings_are_valid_settings(
    resources: dict[tuple[str, str], dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data: dict[str, str] = resources["ConfigMap", "tapeserve-settings"]["data"]
    fields = {f"TAPESERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, f"not settings: {sorted(set(data) - fields)}"
    container = _container(resources)
    sources = container["envFrom"]
    assert {"configMapRef": {"name": "tapeserve-settings"}} in sources
    assert {"secretRef": {"name": "tapeserve-api-keys", "optional": True}} in sources
    # The models file is the models ConfigMap, mounted where TAPESERVE_MODELS points.
    models_path = Path(data["TAPESERVE_MODELS"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(models_path.parent))
    volumes = resources["Deployment", "tapeserve"]["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    models = resources["ConfigMap", volume["configMap"]["name"]]
    assert models_path.name in models["data"]
    # Validate with the service's own Settings (the models file from the repo, as the pod sees it).
    for key in list(os.environ):
        if key.startswith("TAPESERVE_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TAPESERVE_MODELS", str(ROOT / "examples" / "models.yaml"))
    Settings()


def test_models_configmap_is_the_example_file(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    shipped = resources["ConfigMap", "tapeserve-models"]["data"]["models.yaml"]
    assert shipped == (ROOT / "examples" / "models.yaml").read_text(), (
        "deploy/kubernetes/configmap.yaml's models.yaml must be examples/models.yaml verbatim"
    )


def _adapter_rule() -> dict[str, Any]:
    (config_map,) = load_yaml_documents(ADAPTER / "adapter-config.yaml")
    assert config_map["kind"] == "ConfigMap"
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert isinstance(rule, dict)
    return rule


def test_metrics_adapter_config_matches_the_kubernetes_schemas() -> None:
    result = _validate(*sorted(ADAPTER.glob("*.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr
    for path in ADAPTER.glob("*.yaml"):
        for doc in load_yaml_documents(path):
            assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "tapeserve"
            assert "namespace" not in doc["metadata"], "the adapter's namespace is chosen at apply time"


def test_the_autoscaler_follows_pending_jobs_and_keeps_cpu(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    metrics = resources["HorizontalPodAutoscaler", "tapeserve"]["spec"]["metrics"]
    by_type = {m["type"]: m for m in metrics}
    assert set(by_type) == {"Pods", "Resource"}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert by_type["Resource"]["resource"]["target"]["type"] == "Utilization"
    pods = by_type["Pods"]["pods"]
    rule = _adapter_rule()
    # The HPA asks for the metric the adapter's rule names, averaged over the pods.
    assert pods["metric"]["name"] == rule["name"]["as"]
    assert pods["target"]["type"] == "AverageValue" and float(pods["target"]["averageValue"]) > 0
    # Served per pod: the series' namespace and pod labels map to those resources.
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]
    # The pods are scraped where their /metrics is.
    annotations = resources["Deployment", "tapeserve"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"


def _render(template: str, namespace: str, pod: str) -> str:
    """The adapter's Go template for one pod, as it fills it in for the custom metrics API."""
    text = template.replace("<<.LabelMatchers>>", f'namespace="{namespace}",pod=~"{pod}"')
    text = text.replace("<<.GroupBy>>", "pod").replace("<<.Series>>", "tapeserve_queue_depth")
    assert "<<" not in text, text
    return text


TRAIN = {
    "model": {
        "input_shape": [8],
        "seed": 3,
        "layers": [{"type": "dense", "units": 64, "activation": "tanh"}, {"type": "dense", "units": 1}],
    },
    "loss": "mse",
    "optimizer": {"type": "adam", "learning_rate": 0.01},
    "x": [[0.1 * i + 0.01 * j for j in range(8)] for i in range(64)],
    "y": [[0.1 * i] for i in range(64)],
    "steps": 2000,
}


def test_the_adapters_query_follows_a_live_servers_load(ready_server: LiveServer, tmp_path: Path) -> None:
    prometheus_binary()  # skip before anything else
    rule = _adapter_rule()
    labels = {"namespace": "tapeserve-test", "pod": "tapeserve-0"}
    prometheus = start_prometheus(tmp_path / "prometheus", ready_server.url.removeprefix("http://"), labels)
    query = _render(rule["metricsQuery"], **labels)
    try:
        # The adapter discovers the metric with seriesQuery: the server's series carry the pod's labels.
        wait_for(lambda: bool(prometheus.series(rule["seriesQuery"])), "the rule's series are scraped")
        found = prometheus.series(rule["seriesQuery"])
        assert {(s["namespace"], s["pod"]) for s in found} == {(labels["namespace"], labels["pod"])}

        def pending() -> float | None:
            result = prometheus.query(query)
            assert len(result) <= 1 and all(r["metric"] == {"pod": labels["pod"]} for r in result), result
            return float(result[0]["value"][1]) if result else None

        wait_for(lambda: pending() is not None, "the rule's query answers for the pod")
        # Load: three clients keep the one worker busy and two jobs waiting, until the metric shows it.
        stop = threading.Event()
        errors: list[BaseException] = []

        def client() -> None:
            with httpx.Client(base_url=ready_server.url, timeout=120.0) as http:
                while not stop.is_set():
                    try:
                        response = http.post("/v1/model/train-step", json=TRAIN)
                        assert response.status_code == 200, response.text
                    except BaseException as error:  # reported below, not lost in the thread
                        errors.append(error)
                        return

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: (pending() or 0.0) >= 2.0 or bool(errors), "pending jobs reach 2 under load")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        assert not errors, errors
        # And it falls back once the load is gone.
        wait_for(lambda: pending() == 0.0, "pending jobs back to 0")
    finally:
        prometheus.stop()
