"""The Kubernetes manifests (deploy/k8s) render, validate offline, and are wired to the code.

Each overlay is rendered with `kubectl kustomize` and every object validated by `kubernetes-validate`
against the bundled schemas of one Kubernetes version (strict: an unknown field is an error, so a
typo does not pass silently); KEDA's ScaledObject has no bundled schema and is checked here by hand.
Schemas cannot say whether the manifests fit optiforge, so the rest reads the code:
- every variable a container gets is a field of app.core.settings.Settings (or an AWS_* one, or one
  a ScaledObject reads), and the values parse as settings;
- the containers' commands parse with the `optiforge` CLI's own parser;
- the probes are routes of create_app's app that answer without a key;
- the ScaledObjects watch the Redis lists Celery really uses (checked on a real Redis too);
- secrets come only by reference, from keys the example Secret has; no pod shares a volume;
- docker-compose.yml's nodes share no volume either, and reach its S3 service.

Without kubectl (or kubernetes-validate) these tests skip, except in CI (CI or
OPTIFORGE_REQUIRE_SERVICES=1 set) where they fail.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices

from app.api.access_policy import OPEN_PATHS
from app.cli import build_parser
from app.core.job_queue import enqueue_job, queue_for_targets
from app.core.settings import Settings
from engines.backends.registry import backend_names
from tests.conftest import REDIS_URL, REQUIRE_SERVICES, LocalApi, require_service

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"  # kubectl 1.32 renders them here
SECRET_NAME = "optiforge-secrets"
#: Objects of CRDs kubernetes-validate has no schema for; this file checks them itself.
CRD_GROUPS = ("keda.sh/",)
WORKLOAD_KINDS = ("Deployment", "Job")
STRICT = bool(os.environ.get("CI")) or REQUIRE_SERVICES


def _missing(what: str) -> None:
    """Skip without the tool, but fail in CI: there the Kubernetes validation must run."""
    if STRICT:
        pytest.fail(f"{what} (CI: the Kubernetes manifests must be validated)")
    pytest.skip(what)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from `directory`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _missing("kubectl is not installed (it renders the kustomizations)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def rendered(overlay: str) -> list[dict[str, Any]]:
    if overlay not in _RENDERED:
        _RENDERED[overlay] = kustomize(K8S / "overlays" / overlay)
    return _RENDERED[overlay]


# ---------------------------------------------------------------- reading the rendered objects


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} named {name}, found {len(matches)}"
    return matches[0]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) of every Deployment and Job."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj, obj["spec"]["template"]["spec"]


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload, spec in pod_specs(objects):
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, container


def config_data(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    return named(objects, "ConfigMap", name).get("data", {})


def example_secret() -> dict[str, str]:
    return yaml.safe_load((K8S / "secret.example.yaml").read_text())["stringData"]


def container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment the container starts with: its ConfigMaps, then its own variables, with
    secret references read from the example Secret and resource references resolved."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"envFrom other than a ConfigMap: {source}"
        env.update(config_data(objects, source["configMapRef"]["name"]))
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        source = variable["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref["key"] in example_secret():
                env[variable["name"]] = example_secret()[ref["key"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[variable["name"]] = config_data(objects, ref["name"])[ref["key"]]
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, resource = ref["resource"].split(".", 1)
            env[variable["name"]] = str(
                _whole(container["resources"][kind][resource], ref.get("divisor", "1"))
            )
        else:
            raise AssertionError(f"unexpected valueFrom: {source}")
    return env


def _whole(quantity: str, divisor: str) -> int:
    """A CPU quantity divided by `divisor`, rounded up, as a resourceFieldRef gives it."""
    return math.ceil(_cores(quantity) / _cores(divisor))


def _cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def settings_env_names() -> set[str]:
    """The variables Settings reads: OPTIFORGE_<FIELD>, or a field's aliases (REDIS_URL)."""
    prefix = Settings.model_config["env_prefix"]
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def scaled_objects_of(objects: list[dict[str, Any]], deployment: str) -> list[dict[str, Any]]:
    return [
        obj for obj in of_kind(objects, "ScaledObject") if obj["spec"]["scaleTargetRef"]["name"] == deployment
    ]


def keda_env_names(objects: list[dict[str, Any]], deployment: str) -> set[str]:
    """Variables a ScaledObject reads from its target's container (`…FromEnv`), not optiforge."""
    return {
        value
        for scaled in scaled_objects_of(objects, deployment)
        for trigger in scaled["spec"]["triggers"]
        for key, value in trigger["metadata"].items()
        if key.endswith("FromEnv")
    }


def cli_args(container: dict[str, Any]) -> Any:
    """The container's command as the `optiforge` CLI parses it."""
    command = container.get("command", []) + container.get("args", [])
    assert command[0] == "optiforge", f"{container['name']} does not run the optiforge command: {command}"
    return build_parser().parse_args(command[1:])


def code_queues() -> set[str]:
    """Every queue a job can be sent to: the backends' queues, and `cpu` for the other job kinds."""
    return {queue_for_targets([name]) for name in backend_names()} | {"cpu"}


# ---------------------------------------------------------------- schemas


def test_every_object_validates_against_the_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed (pip install -e '.[dev]')")
    checked, invalid = 0, []
    for obj in rendered:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue  # no bundled schema: test_scaled_objects_watch_the_queues_the_code_uses reads them
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:  # its text holds the whole schema: say less
            where = ".".join(str(part) for part in error.path)
            invalid.append(f"{obj['kind']} {obj['metadata']['name']}: {where}: {error.message}")
        checked += 1
    assert not invalid, "\n".join(invalid)
    kinds = {obj["kind"] for obj in rendered}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Job", "ConfigMap"} <= kinds
    assert {"PodDisruptionBudget", "ServiceAccount", "ScaledObject"} <= kinds
    assert checked == len([obj for obj in rendered if not obj["apiVersion"].startswith(CRD_GROUPS)])


def test_the_example_secret_validates_and_is_never_rendered(rendered: list[dict[str, Any]]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed (pip install -e '.[dev]')")
    kubernetes_validate.validate(
        yaml.safe_load((K8S / "secret.example.yaml").read_text()), KUBERNETES_VERSION, strict=True
    )
    assert not of_kind(rendered, "Secret"), "secret values must not be part of the kustomization"


# ---------------------------------------------------------------- wiring to the code


def test_every_variable_is_a_setting(rendered: list[dict[str, Any]]) -> None:
    known = settings_env_names()
    for workload, container in containers(rendered):
        keda = keda_env_names(rendered, workload["metadata"]["name"])
        unknown = {
            name
            for name in container_env(rendered, container)
            if name not in known and not name.startswith("AWS_") and name not in keda
        }
        assert not unknown, (
            f"{workload['kind']} {workload['metadata']['name']} sets variables that Settings does not read "
            f"(app/core/settings.py would ignore them): {sorted(unknown)}"
        )


def test_the_values_parse_as_settings(
    rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each container's environment makes valid Settings: PostgreSQL, Redis, and for the API and
    the workers an S3 store (no node reads artifacts from a shared disk)."""
    for workload, container in containers(rendered):
        name = workload["metadata"]["name"]
        with monkeypatch.context() as patched:
            for variable, value in container_env(rendered, container).items():
                patched.setenv(variable, value)
            settings = Settings()
        assert settings.resolved_database_url.startswith("postgresql"), name
        if workload["kind"] == "Deployment":
            assert urlsplit(settings.broker_url or "").scheme == "redis", name
            assert urlsplit(settings.resolved_artifact_url).scheme == "s3", name


def test_commands_are_real_cli_commands(rendered: list[dict[str, Any]]) -> None:
    commands = {
        workload["metadata"]["name"]: cli_args(container).command
        for workload, container in containers(rendered)
    }
    assert commands["optiforge-api"] == "serve"
    assert commands["optiforge-migrate"] == "migrate"
    assert commands["optiforge-worker-cpu"] == "worker"
    api = cli_args(
        named(rendered, "Deployment", "optiforge-api")["spec"]["template"]["spec"]["containers"][0]
    )
    assert api.worker is False, "the API must not start a worker of its own: the workers are Deployments"
    assert api.host == "0.0.0.0"


def test_probes_are_open_routes_of_the_app(rendered: list[dict[str, Any]], local_api: LocalApi) -> None:
    deployment = named(rendered, "Deployment", "optiforge-api")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    # create_app's GET routes, as its OpenAPI document lists them (FastAPI nests included routers).
    routes = {
        path for path, operations in local_api.client.app.openapi()["paths"].items() if "get" in operations
    }
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    probes = {
        kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for kind, probe in probes.items():
        assert probe["path"] in routes, f"{kind} asks for {probe['path']}, which is no route of the app"
        assert probe["path"] in OPEN_PATHS, (
            f"{kind}: {probe['path']} needs a key, which a kubelet does not have"
        )
        assert probe["port"] in ports, f"{kind} names port {probe['port']}, which the container does not have"
        assert local_api.client.get(probe["path"]).status_code == 200
    assert cli_args(container).port == ports["http"]
    service = named(rendered, "Service", "optiforge-api")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert all(port["targetPort"] in ports for port in service["spec"]["ports"])


def test_scaled_objects_watch_the_queues_the_code_uses(overlay: str, rendered: list[dict[str, Any]]) -> None:
    """Each worker Deployment has a ScaledObject on the Redis list of the queue it consumes: Celery
    keeps a queue as a list named OPTIFORGE_QUEUE_PREFIX + the queue name (Settings.queue)."""
    broker = urlsplit(example_secret()["broker-url"])
    database_index = broker.path.lstrip("/") or "0"
    watched: set[str] = set()
    for workload, container in containers(rendered):
        if workload["kind"] != "Deployment" or cli_args(container).command != "worker":
            continue
        name = workload["metadata"]["name"]
        queues = cli_args(container).queues.split(",")
        env = container_env(rendered, container)
        settings = Settings(queue_prefix=env.get("OPTIFORGE_QUEUE_PREFIX", ""))
        scaled = scaled_objects_of(rendered, name)
        assert len(scaled) == 1, f"{name} needs one ScaledObject"
        spec = scaled[0]["spec"]
        assert spec["scaleTargetRef"].get("envSourceContainerName", container["name"]) == container["name"]
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        lists = set()
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis"
            metadata = trigger["metadata"]
            lists.add(metadata["listName"])
            assert int(metadata["listLength"]) >= 1
            assert metadata.get("databaseIndex", "0") == database_index, "the broker URL's database"
            for key, variable in metadata.items():
                if key.endswith("FromEnv"):
                    assert any(item["name"] == variable for item in container.get("env", [])), (
                        f"KEDA reads {variable} from {name}'s container, which does not set it"
                    )
            assert "addressFromEnv" in metadata or "address" in metadata
        assert lists == {settings.queue(queue) for queue in queues}
        watched.update(queues)
    assert watched <= code_queues()
    assert watched == ({"cpu", "gpu"} if overlay == "gpu" else {"cpu"})
    assert code_queues() == {"cpu", "gpu"}


@pytest.mark.redis
@pytest.mark.parametrize("queue", ["cpu", "gpu"])
def test_a_queued_job_lands_in_the_redis_list_the_scaled_object_watches(queue: str, tmp_path: Path) -> None:
    """What KEDA's redis scaler counts (LLEN of listName) is where enqueue_job puts a job."""
    import redis

    url = urlsplit(REDIS_URL)
    require_service("Redis", url.hostname or "127.0.0.1", url.port or 6379)
    prefix = f"k8s-{secrets.token_hex(4)}-"
    settings = Settings(data_dir=tmp_path, broker_url=REDIS_URL, queue_prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        enqueue_job(settings, "job_k8s_probe", queue)
        assert client.llen(settings.queue(queue)) == 1
        assert client.type(settings.queue(queue)) == b"list"
    finally:
        for key in client.scan_iter(f"*{prefix}*"):
            client.delete(key)


def test_the_gpu_worker_asks_for_a_gpu(overlay: str, rendered: list[dict[str, Any]]) -> None:
    gpu_asked = [
        workload["metadata"]["name"]
        for workload, container in containers(rendered)
        if "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
    ]
    if overlay == "cpu":
        assert not gpu_asked
        return
    assert gpu_asked == ["optiforge-worker-gpu"]
    deployment = named(rendered, "Deployment", "optiforge-worker-gpu")
    spec = deployment["spec"]["template"]["spec"]
    assert int(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert cli_args(spec["containers"][0]).queues == "gpu"
    assert spec["nodeSelector"]
    assert any(toleration["key"] == "nvidia.com/gpu" for toleration in spec["tolerations"])
    assert named(rendered, "PodDisruptionBudget", "optiforge-worker-gpu")


def test_secrets_come_by_reference_from_keys_the_example_has(rendered: list[dict[str, Any]]) -> None:
    keys = set(example_secret())
    secret_settings = {"OPTIFORGE_DATABASE_URL", "OPTIFORGE_BROKER_URL", "OPTIFORGE_BOOTSTRAP_API_KEY"}
    for workload, container in containers(rendered):
        for variable in container.get("env", []):
            if variable["name"] in secret_settings or variable["name"].startswith("AWS_SECRET"):
                assert "secretKeyRef" in variable.get("valueFrom", {}), f"{variable['name']} given in clear"
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == SECRET_NAME and ref["key"] in keys, (workload["metadata"]["name"], ref)
        for source in container.get("envFrom", []):
            data = config_data(rendered, source["configMapRef"]["name"])
            assert not secret_settings & data.keys() and "AWS_SECRET_ACCESS_KEY" not in data


def test_pods_are_unprivileged_and_share_no_volume(rendered: list[dict[str, Any]]) -> None:
    """Non-root, read-only root file system: everything optiforge writes (data dir, cache, /tmp)
    is a node-local emptyDir, and the cache's emptyDir outgrows OPTIFORGE_CACHE_MAX_BYTES."""
    for workload, spec in pod_specs(rendered):
        name = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec.get("automountServiceAccountToken") is False, name
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for volume in volumes.values():
            assert "emptyDir" in volume or "configMap" in volume, f"{name}: volume {volume['name']} is shared"
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            mounts = {
                mount["mountPath"]: volumes[mount["name"]] for mount in container.get("volumeMounts", [])
            }
            env = container_env(rendered, container)
            writable = ["/tmp", env["OPTIFORGE_DATA_DIR"]]
            if workload["kind"] == "Deployment":
                writable.append(env["OPTIFORGE_CACHE_DIR"])
            for path in writable:
                assert "emptyDir" in mounts.get(path, {}), f"{name} writes {path}, which is not an emptyDir"
            if "OPTIFORGE_CACHE_DIR" in env and env["OPTIFORGE_CACHE_DIR"] in mounts:
                limit = _bytes(mounts[env["OPTIFORGE_CACHE_DIR"]]["emptyDir"]["sizeLimit"])
                assert int(env["OPTIFORGE_CACHE_MAX_BYTES"]) < limit, (
                    f"{name}: the cache outgrows its emptyDir"
                )


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def test_api_and_workers_have_budgets_and_autoscalers(overlay: str, rendered: list[dict[str, Any]]) -> None:
    deployments = {obj["metadata"]["name"]: obj for obj in of_kind(rendered, "Deployment")}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        budgets = [
            pdb
            for pdb in of_kind(rendered, "PodDisruptionBudget")
            if pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(budgets) == 1, f"{name} needs one PodDisruptionBudget"
        assert "replicas" not in deployment["spec"], f"{name}: its autoscaler owns the replica count"
    hpa = named(rendered, "HorizontalPodAutoscaler", "optiforge-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "optiforge-api"
    assert [metric["resource"]["name"] for metric in hpa["spec"]["metrics"]] == ["cpu"]
    api = deployments["optiforge-api"]["spec"]["template"]["spec"]["containers"][0]
    assert "cpu" in api["resources"]["requests"], "HPA's CPU utilisation is relative to the request"
    workers = {name for name in deployments if name.startswith("optiforge-worker-")}
    assert workers == {
        f"optiforge-worker-{queue}" for queue in OVERLAYS if overlay == "gpu" or queue == "cpu"
    }
    job = named(rendered, "Job", "optiforge-migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


def test_the_s3_ca_component_mounts_the_bundle_it_names(tmp_path: Path) -> None:
    """The component for self-signed S3 endpoints, added to the GPU overlay the way a user would."""
    base = Path(os.path.relpath(K8S, tmp_path))  # kustomize refuses absolute paths to other kustomizations
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [str(base / "overlays" / "gpu")],
                "components": [str(base / "components" / "s3-ca")],
            }
        )
    )
    objects = kustomize(tmp_path)
    for workload, container in containers(objects):
        if workload["kind"] != "Deployment":
            continue
        bundle = container_env(objects, container)["OPTIFORGE_S3_CA_BUNDLE"]
        mounts = [mount["mountPath"] for mount in container["volumeMounts"]]
        assert any(bundle.startswith(path.rstrip("/") + "/") for path in mounts), workload["metadata"]["name"]
        assert "OPTIFORGE_S3_CA_BUNDLE" in settings_env_names()


# ---------------------------------------------------------------- docker compose


def test_compose_nodes_share_no_volume_and_reach_the_s3_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    owners: dict[str, str] = {}
    for name, service in services.items():
        for mount in service.get("volumes", []):
            volume = mount.split(":", 1)[0]
            assert volume not in owners, f"{name} and {owners.get(volume)} share the volume {volume}"
            owners[volume] = name
    known = settings_env_names()
    s3_command = (ROOT / "deploy" / "compose" / "s3rver" / "Dockerfile").read_text()
    for name in ("api", "worker", "gpu-worker"):
        env = services[name]["environment"]
        assert env["OPTIFORGE_ARTIFACT_URL"].startswith("s3://"), name
        endpoint = urlsplit(env["OPTIFORGE_S3_ENDPOINT_URL"])
        assert endpoint.hostname in services and f'"{endpoint.port}"' in s3_command, name
        assert f'"--configure-bucket", "{urlsplit(env["OPTIFORGE_ARTIFACT_URL"]).hostname}"' in s3_command
        unknown = {key for key in env if key not in known and not key.startswith("AWS_")}
        assert not unknown, f"compose's {name} sets variables Settings does not read: {sorted(unknown)}"
