"""cluster.yaml against Ray's own cluster-config validation, and the KubeRay manifests in k8s/
against the fields they use; every Ray image, in both, of the installed Ray's version."""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from din_ray.cli import build_parser
from din_ray.serve import app as serve_app
from din_ray.serve.access import TOKEN_ENV, is_loopback
from din_ray.serve.settings import REQUEST_TIMEOUT_S, BatchingConfig, ServeArgs

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
MANIFESTS = {"rayjob-train.yaml": "RayJob", "rayjob-tune.yaml": "RayJob",
             "rayservice.yaml": "RayService"}
RAY_IMAGE = re.compile(r"rayproject/ray:(?P<version>[0-9][^-\s]*)-py(?P<py>\d+)-(?P<kind>cpu|gpu)")


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does before it touches the cloud: fill in the provider's defaults, merge
    the setup commands, and validate against ray-schema.json plus Ray's own checks."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --- cluster.yaml -------------------------------------------------------------------------------
def test_cluster_yaml_passes_rays_validation():
    prepared = ray_validate(load_cluster())
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize("breakage", [
    lambda c: c["available_node_types"]["head"].update(resources={"CPU": -1}),
    lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="none"),
    lambda c: c.update(head_node_type="missing"),
    lambda c: c.update(max_workers=0, available_node_types={
        **c["available_node_types"],
        "cpu_worker": {**c["available_node_types"]["cpu_worker"], "min_workers": 1}}),
    lambda c: c["docker"].update(gpu_image="rayproject/ray:latest"),
])
def test_ray_validation_rejects_broken_copies(breakage):
    config = load_cluster()
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def test_cluster_layout():
    c = load_cluster()
    types = c["available_node_types"]
    assert types[c["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no training
    gpu, cpu = types["gpu_worker"], types["cpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert re.match(r"(g|p)\d", gpu["node_config"]["InstanceType"])  # an AWS GPU family
    assert cpu["min_workers"] == 0 and cpu["max_workers"] >= 1
    assert c["max_workers"] >= gpu["max_workers"]
    # Images: CUDA for GPU workers, CPU builds for the head and the CPU workers.
    assert RAY_IMAGE.search(c["docker"]["image"])["kind"] == "gpu"
    assert RAY_IMAGE.search(c["docker"]["head_image"])["kind"] == "cpu"
    assert RAY_IMAGE.search(cpu["docker"]["worker_image"])["kind"] == "cpu"
    # din-ray is installed, from the checkout that file_mounts copies, on every node type.
    checkout = next(remote for remote, local in c["file_mounts"].items() if local == ".")
    install = f"pip install -q -e {checkout}"
    for commands in (c["head_setup_commands"], c["worker_setup_commands"],
                     cpu["worker_setup_commands"]):
        assert install in commands
    assert {".venv", "runs"} <= set(c["rsync_exclude"])
    # Token authentication on every node, with the token shipped by file_mounts.
    assert "/home/ray/.ray/auth_token" in c["file_mounts"]
    for command in (*c["head_start_ray_commands"], *c["worker_start_ray_commands"]):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command


def test_torch_pin_matches_the_installed_torch():
    pins = set(re.findall(r"torch==(\S+)", CLUSTER.read_text() + _dockerfile()))
    assert pins == {torch.__version__.split("+")[0]}


# --- k8s/ ---------------------------------------------------------------------------------------
def _dockerfile() -> str:
    return (REPO / "k8s" / "Dockerfile").read_text()


def load_manifest(name: str) -> dict:
    docs = list(yaml.safe_load_all((REPO / "k8s" / name).read_text()))
    assert len(docs) == 1, f"{name}: one resource per file"
    return docs[0]


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec" if manifest["kind"] == "RayJob"
                            else "rayClusterConfig"]


def _check_pod_template(where: str, template: dict, volume_claims: set[str]) -> None:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for container in containers:
        assert container["name"] and container["image"], where
        for key in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][key]), f"{where}: {key}"
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: mount {mount['name']} has no volume"
            claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
            volume_claims.add(claim)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_structure(name):
    m = load_manifest(name)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == MANIFESTS[name]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", m["metadata"]["name"])
    spec = cluster_spec(m)
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs no training or replicas
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    claims: set[str] = set()
    _check_pod_template(f"{name}: head", head["template"], claims)
    assert spec["workerGroupSpecs"], f"{name}: no worker groups"
    for group in spec["workerGroupSpecs"]:
        where = f"{name}: worker group {group['groupName']}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), where
        _check_pod_template(where, group["template"], claims)
    assert claims == {"din-ray-shared"}  # every pod sees the same shared filesystem


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_rayjob_entrypoint_parses_as_its_job(name):
    spec = load_manifest(name)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("/home/ray/din-ray/jobs/")
    job = Path(argv[1]).stem
    assert (REPO / "jobs" / f"{job}.py").exists()
    # The job's own parser (din-ray's subcommand) accepts the arguments.
    args = build_parser().parse_args([job, *argv[2:]])
    assert args.output.startswith("/mnt/shared/")
    assert args.storage_path.startswith("/mnt/shared/")


def test_rayservice_serve_config_is_a_serve_config():
    spec = load_manifest("rayservice.yaml")["spec"]
    config = yaml.safe_load(spec["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "0.0.0.0"  # KubeRay's Service reaches the proxies
    assert schema.http_options.request_timeout_s == REQUEST_TIMEOUT_S  # an error, never a hang
    (app,) = schema.applications
    assert app.import_path == "din_ray.serve.app:build_app"
    ServeArgs.model_validate(app.args)  # what Serve does with the typed builder's args
    (deployment,) = config["applications"][0]["deployments"]
    batching = BatchingConfig.from_dict(deployment.get("user_config"))
    assert deployment.get("max_ongoing_requests", ServeArgs.model_fields[
        "max_ongoing_requests"].default) >= batching.max_batch_size


SERVE_CONFIGS = {"serve/config.yaml": lambda: yaml.safe_load((REPO / "serve/config.yaml")
                                                             .read_text()),
                 "k8s/rayservice.yaml": lambda: yaml.safe_load(
                     load_manifest("rayservice.yaml")["spec"]["serveConfigV2"])}


@pytest.mark.parametrize("name", sorted(SERVE_CONFIGS))
def test_serve_configs_beyond_loopback_require_the_token(name, monkeypatch):
    config = SERVE_CONFIGS[name]()
    (app,) = config["applications"]
    if is_loopback(config["http_options"]["host"]):
        assert not app["args"].get("require_token"), name  # open only to this machine
        return
    assert app["args"].get("require_token") is True, f"{name} binds beyond loopback without a token"
    # Without the token where the app is built, the deploy fails rather than serve openly ...
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="require_token is set but there is no API token"):
        serve_app.build_app(app["args"])
    # ... and with it, the replicas get its digest (and check it on every endpoint).
    token = "k8s-token-0123456789abcdef"
    monkeypatch.setenv(TOKEN_ENV, token)
    digest = serve_app._token_digest(ServeArgs.model_validate(app["args"]))
    assert digest == hashlib.sha256(token.encode()).hexdigest()


def test_rayservice_pods_take_the_token_from_a_secret():
    spec = cluster_spec(load_manifest("rayservice.yaml"))
    groups = {"head": spec["headGroupSpec"],
              **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    for where, group in groups.items():
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert TOKEN_ENV in env, f"{where}: {container['name']} has no ${TOKEN_ENV}"
            # From a Secret, never written into the manifest, and not optional: without the
            # Secret the pod does not start.
            assert "value" not in env[TOKEN_ENV], where
            ref = env[TOKEN_ENV]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "din-ray-serve-token", "key": "token"}, where


# --- one Ray everywhere -------------------------------------------------------------------------
def test_every_ray_image_is_the_installed_ray():
    texts = {"cluster.yaml": CLUSTER.read_text(), "k8s/Dockerfile": _dockerfile()}
    images = [(where, m) for where, text in texts.items() for m in RAY_IMAGE.finditer(text)]
    assert len(images) >= 4, images
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    for where, m in images:
        assert m["version"] == ray.__version__, f"{where}: {m[0]} is not Ray {ray.__version__}"
        assert m["py"] == py, f"{where}: {m[0]} is not Python {py}, the Python tested here"
