"""docs/deploy/: the Kubernetes manifests validate against the Kubernetes JSON schemas (bundled by
kubernetes-validate, offline), and what they say about the server matches the code: ports, the probe
port, the drain time, the metric the autoscaler reads, the container's arguments."""

from __future__ import annotations

import re
import shlex
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from pagedserve.config import ServeConfig, ServerConfig
from pagedserve.metrics import EngineState, LLMMetrics, ServerCollector
from pagedserve.repository import ModelRepository
from pagedserve.statistics import ModelStats

from .conftest import REPO
from .test_config import compose_config

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = REPO / "docs" / "deploy"
# The oldest release with everything used here as GA (gRPC probes: 1.27), and the newest bundled.
KUBERNETES_VERSIONS = ["1.27", "1.37"]
SERVER = ServerConfig()


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource in docs/deploy/*.yaml, by kind."""
    resources = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for resource in yaml.safe_load_all(path.read_text()):
            assert resource["kind"] not in resources, f"two {resource['kind']}s"
            resources[resource["kind"]] = resource
    return resources


RESOURCES = manifests()
DEPLOYMENT = RESOURCES["Deployment"]
POD = DEPLOYMENT["spec"]["template"]
CONTAINER = POD["spec"]["containers"][0]


def test_every_kind_is_there() -> None:
    assert set(RESOURCES) == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kind", sorted(RESOURCES))
def test_manifest_validates_against_the_kubernetes_schema(kind: str, version: str) -> None:
    # strict: a misspelt or misplaced field is an error, not silently ignored as kubectl would.
    kubernetes_validate.validate(RESOURCES[kind], version, strict=True)


def test_schema_validation_catches_a_bad_field() -> None:
    broken = yaml.safe_load(yaml.safe_dump(DEPLOYMENT))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def container_port(name: str) -> int:
    return next(port["containerPort"] for port in CONTAINER["ports"] if port["name"] == name)


def test_ports_are_the_servers_defaults() -> None:
    assert container_port("grpc") == SERVER.grpc_port
    assert container_port("http") == SERVER.http_port
    assert container_port("metrics") == SERVER.metrics_port
    service_ports = {port["name"]: port for port in RESOURCES["Service"]["spec"]["ports"]}
    for name, port in service_ports.items():
        assert port["port"] == container_port(name)
        assert port["targetPort"] == name
    assert RESOURCES["Service"]["spec"]["selector"] == DEPLOYMENT["spec"]["selector"]["matchLabels"]


def test_probes_ask_grpc_health_on_the_grpc_port() -> None:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert CONTAINER[probe]["grpc"] == {"port": SERVER.grpc_port}  # service "": the whole server


def test_prometheus_scrapes_the_metrics_port() -> None:
    annotations = POD["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == SERVER.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def overrides() -> list[str]:
    return CONTAINER["args"]


def test_container_arguments_compose_into_the_server_config() -> None:
    config = compose_config(*overrides())
    assert isinstance(config, ServeConfig)
    assert config.startup_models() == ["llama3"]


def test_grace_period_covers_prestop_and_the_drain() -> None:
    config = compose_config(*overrides())
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    grace_s = POD["spec"]["terminationGracePeriodSeconds"]
    # The kubelet's clock starts with preStop; SIGTERM comes after it, then the drain, then the
    # engine processes stop. Less than that and in-flight requests get SIGKILLed.
    assert grace_s >= pre_stop_s + config.server.exit_timeout_s + 5, (grace_s, pre_stop_s)


def test_gpu_is_requested() -> None:
    resources = CONTAINER["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1


def served_metric_names(model_name: str) -> set[str]:
    """The families /metrics serves for ``model_name`` of the repository (``conf/models``), from the
    real collector: the ``vllm:*`` ones only when its config sets ``REPORT_CUSTOM_METRICS``."""
    spec = ModelRepository(REPO / "conf" / "models").read(model_name)
    model = SimpleNamespace(engine_metrics=lambda: LLMMetrics().snapshot(EngineState(0, 3, 0.0, 0, 0, 0)))
    version = SimpleNamespace(
        spec=spec, version=1, stats=ModelStats(), inflight=0, policy=SimpleNamespace(model=model)
    )
    manager = SimpleNamespace(ready_versions=lambda: [version])
    return {family.name for family in ServerCollector(manager).collect()}  # type: ignore[arg-type]


def test_autoscaler_reads_a_metric_the_server_serves() -> None:
    rules = yaml.safe_load(RESOURCES["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert len(rules) == 1
    rule = rules[0]
    series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    assert series.group(1) == "vllm:num_requests_waiting"
    assert series.group(1) in served_metric_names(compose_config(*overrides()).startup_models()[0])
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    hpa_metrics = RESOURCES["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert [m["pods"]["metric"]["name"] for m in hpa_metrics] == [rule["name"]["as"]]
    target = RESOURCES["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per logical line (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_runs_serve_on_cuda_with_the_documented_torch() -> None:
    instructions = dockerfile()
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("nvidia/cuda:")
    assert ("ENTRYPOINT", '["serve"]') in instructions
    exposed = {int(port) for kind, args in instructions if kind == "EXPOSE" for port in args.split()}
    assert exposed == {SERVER.http_port, SERVER.grpc_port, SERVER.metrics_port}
    installs = [shlex.split(args) for kind, args in instructions if kind == "RUN" and "pip install" in args]
    torch_pin = next(word for words in installs for word in words if word.startswith("torch=="))
    documented = re.search(r"pip install (torch==\S+)", (REPO / "docs" / "install.md").read_text())
    assert documented and torch_pin == documented.group(1)
    # torch before the project, so the project's "torch>=..." range installs nothing more.
    project = next(i for i, words in enumerate(installs) if "/src" in words)
    assert any("torch==" in word for word in installs[project - 1])
    copied = {args.split()[0] for kind, args in instructions if kind == "COPY"}
    assert {"framework", "plugins", "conf"} <= copied
    assert all((REPO / name).exists() for name in copied)


def test_deploy_readme_names_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.iterdir():
        if path.name != "README.md":
            assert path.name in readme, path.name
