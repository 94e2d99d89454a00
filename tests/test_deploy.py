"""What can be checked of `deploy/` without Docker or a cluster: the compose file parses and
runs every role with real settings, the Kubernetes manifests validate against the API schemas,
the Dockerfile runs the documented entry point as a non-root user, and the dashboard asks only
for metrics the workers serve."""

import dataclasses
import json
import re
from pathlib import Path

import kubernetes_validate
import yaml

from ledger.settings import PREFIX, Settings
from ledger.worker import ROLES

DEPLOY = Path(__file__).parents[1] / "deploy"
SETTINGS = {PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}


def test_compose_runs_every_role_with_real_settings():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    for role in ROLES:
        assert services[role]["command"] == ["worker", "--role", role]
        assert services[role]["image"] == "billing-ledger"
    assert services["migrate"]["command"] == ["db", "migrate"]
    assert services["topics"]["command"] == ["topics", "create"]
    for name in ("kafka", "postgres", "prometheus"):
        assert name in services
    for name, service in services.items():
        for variable in service.get("environment", {}):
            if variable.startswith(PREFIX):
                assert variable in SETTINGS, f"{name}: {variable} is not a setting"
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in targets) == sorted(ROLES)


def test_kubernetes_manifests_validate_and_give_each_role_its_replica_semantics():
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            listed = yaml.safe_load(path.read_text())["resources"]
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, "1.30", strict=True)
            docs.append(doc)
    assert sorted(listed) == sorted(
        p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert sorted(deployments) == sorted(f"ledger-{role}" for role in ROLES)
    settings = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    port = int(settings["LEDGER_METRICS_PORT"])
    for role in ROLES:
        spec = deployments[f"ledger-{role}"]["spec"]
        single = role == "scheduler"
        assert (spec["replicas"] == 1) == single  # a relay has a standby (its lock)
        assert (spec["strategy"]["type"] == "Recreate") == single
        [container] = spec["template"]["spec"]["containers"]
        assert container["args"] == ["worker", "--role", role]
        assert container["ports"] == [{"name": "metrics", "containerPort": port}]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for doc in docs:
        for variable in doc.get("data", {}) | doc.get("stringData", {}):
            assert variable in SETTINGS, f"{doc['metadata']['name']}: {variable}"
    job = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]
    steps = [c["args"] for c in job["initContainers"] + job["containers"]]
    assert steps == [["db", "migrate"], ["topics", "create"]]


def test_the_dockerfile_runs_the_ledger_entry_point_as_a_non_root_user():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    assert 'ENTRYPOINT ["ledger"]' in text
    assert re.search(r"^USER (?!root|0\b)\S+$", text, re.M)
    [port] = re.findall(r"LEDGER_METRICS_PORT=(\d+)", text)
    assert f"EXPOSE {port}" in text
    for source in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (DEPLOY.parent / source).exists(), source
    readme = (DEPLOY.parent / "README.md").read_text()
    assert "docker build -f deploy/Dockerfile -t billing-ledger ." in readme


def test_the_dashboard_asks_only_for_metrics_the_workers_serve():
    dashboard = json.loads((DEPLOY / "grafana" / "ledger-dashboard.json").read_text())
    served = set(
        re.findall(r'"(ledger_[a-z_]+)"', (DEPLOY.parent / "ledger" / "metrics.py").read_text())
    )
    asked = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            asked |= set(re.findall(r"ledger_[a-z_]+", target["expr"]))
    assert asked
    for name in sorted(asked):
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert base in served, f"{name}: no such metric in ledger/metrics.py"
