"""The Kubernetes files, validated offline against the Kubernetes schemas (kubernetes-validate), and checked for
the shape that serving across hosts needs: the registry in object storage, no shared volume, engine discovery."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).parents[3] / "deploy" / "k8s"
KUBERNETES = "1.30.0"
DOCS = [(f.name, i, doc) for f in sorted(K8S.glob("*.yaml")) for i, doc in enumerate(yaml.safe_load_all(f.read_text()))]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, _, doc in DOCS if doc["kind"] == kind]


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("doc", [d for _, _, d in DOCS if d["kind"] != "ServiceMonitor"],
                         ids=[f"{f}:{i}:{d['kind']}" for f, i, d in DOCS if d["kind"] != "ServiceMonitor"])
def test_manifest_is_valid_against_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_service_monitors_have_what_the_operator_requires():
    """The ServiceMonitor is a custom resource with no schema in kubernetes-validate: its required fields by hand."""
    monitors = by_kind("ServiceMonitor")
    assert monitors
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1" and m["metadata"]["name"]
        labels = m["spec"]["selector"]["matchLabels"]
        targets = [s for s in services.values() if labels.items() <= s["metadata"].get("labels", {}).items()]
        assert targets, f"ServiceMonitor {m['metadata']['name']} selects no Service"
        for endpoint in m["spec"]["endpoints"]:
            assert any(p["name"] == endpoint["port"] for s in targets for p in s["spec"]["ports"])
            secrets = {s["metadata"]["name"] for s in by_kind("Secret")}
            assert endpoint["authorization"]["credentials"]["name"] in secrets


def test_gateways_and_engines_share_no_volume_and_read_the_registry_from_object_storage():
    assert not by_kind("PersistentVolumeClaim")
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    assert secrets["loraplex-s3"]["stringData"]["LORAPLEX_REGISTRY"].startswith("s3://")
    cron = [c["spec"]["jobTemplate"] for c in by_kind("CronJob")]
    for workload in by_kind("Deployment") + by_kind("StatefulSet") + by_kind("Job") + cron:
        pod = workload["spec"]["template"]["spec"]
        assert all("persistentVolumeClaim" not in v for v in pod.get("volumes", []))
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert {"secretRef": {"name": "loraplex-s3"}} in container["envFrom"]


def test_engines_run_loraplex_engine_behind_a_headless_service_the_gateways_resolve():
    [engines] = by_kind("StatefulSet")
    engine = engines["spec"]["template"]["spec"]["containers"][0]
    assert engine["command"][:2] == ["loraplex", "engine"]
    port = engine["command"][engine["command"].index("--port") + 1]
    assert env(engine)["LORAPLEX_ENGINE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "loraplex-engine"
    headless = next(s for s in by_kind("Service") if s["metadata"]["name"] == engines["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["ports"][0]["port"] == int(port)
    gateway = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "loraplex")
    assert gateway["spec"]["replicas"] >= 2
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert env(container)["LORAPLEX_ENGINE_DNS"]["value"] == f"http://{headless['metadata']['name']}:{port}"
    assert env(container)["LORAPLEX_ENGINE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "loraplex-engine"
    assert env(container)["LORAPLEX_HOST"]["value"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    [job] = by_kind("Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["loraplex", "train"]


def test_a_cron_job_refreshes_an_adapter_from_its_stored_completions_one_run_at_a_time():
    [cron] = by_kind("CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["loraplex", "refresh"] and "--since" in container["command"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
