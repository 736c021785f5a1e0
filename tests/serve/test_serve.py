"""The Ray Serve app over real HTTP: a checkpoint trained here, one Serve instance per module.

Covers scores equal to offline predictions, ordering, explain, every bad-input case (the server
keeps serving), fuzzed hostile bodies (never a 5xx, the replica survives), the API token,
candidate-counted batches forming under concurrent load, `user_config` reconfiguring the live
replica's batch size without a restart, `din-ray predict` on Ray Data equal to in-process, and
served CTRs (requests built from raw ids) equal to `din-ray predict`'s for DIN and DeepFM (a
second application on the same Serve instance).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import requests
from serve_helpers import (
    BAD_REQUESTS,
    fuzz_strategies,
    offline_scores,
    payloads,
    raw_items,
    train_tiny,
)

from din_ray.data.format import PreparedDataset
from din_ray.predict import CTR, PredictConfig, predict, read_predictions, to_arrays
from din_ray.schema import PAD_ID

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from din_ray.serve import app, grpc_api  # noqa: E402
from din_ray.serve import deploy as serve_deploy  # noqa: E402
from din_ray.serve.settings import (  # noqa: E402
    GPU_BATCH_WAIT_S,
    GPU_MAX_BATCH_SIZE,
    REQUEST_TIMEOUT_S,
    BatchingConfig,
    ServeArgs,
)

pytestmark = pytest.mark.timeout(400)

# The module's app requires this token (as a server bound beyond loopback would).
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_serve_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run = train_tiny(root, "din")
    port, grpc_port = _free_port(), _free_port()
    args = {"checkpoint": str(run), "max_candidates": 8, "max_body_bytes": 4000,
            "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    try:
        serve_deploy.deploy(serve_deploy.app_config(args, port=port, grpc_port=grpc_port,
                                                    user_config={"max_batch_size": 64,
                                                                 "batch_wait_timeout_s": 0.05}))
        yield {"url": f"http://127.0.0.1:{port}", "run": run, "root": root, "args": args,
               "port": port, "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        serve.shutdown()


def _post(server, payload, **kw) -> requests.Response:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {**AUTH, **kw.pop("headers", {})}
    return requests.post(f"{server['url']}/v1/ctr", data=data, timeout=60, headers=headers,
                         **kw)


def _model_info(server) -> dict:
    return requests.get(f"{server['url']}/v1/model", timeout=60, headers=AUTH).json()


def _stats(server) -> dict:
    return requests.get(f"{server['url']}/v1/stats", timeout=60, headers=AUTH).json()


async def _burst(url: str, bodies: list[dict]) -> list[dict]:
    """Send all `bodies` at once; the replica may merge them into batches."""
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async def one(body):
            async with session.post(f"{url}/v1/ctr", json=body) as r:
                assert r.status == 200, await r.text()
                return await r.json()
        return await asyncio.gather(*(one(b) for b in bodies))


def test_scores_equal_offline_predictions(server):
    for payload in payloads(server["root"] / "data", 4, seed=7):
        r = _post(server, payload)
        assert r.status_code == 200, r.text
        offline, _ = offline_scores(server["run"] / "checkpoint", payload)
        np.testing.assert_allclose(r.json()["scores"], offline, atol=1e-5, rtol=0)


def test_scores_follow_candidate_order(server):
    payload = payloads(server["root"] / "data", 1, candidates=8, seed=2)[0]
    scores = _post(server, payload).json()["scores"]
    payload["candidates"] = payload["candidates"][::-1]
    assert _post(server, payload).json()["scores"] == pytest.approx(scores[::-1], abs=1e-6)


def test_explain_returns_weights_per_behaviour_and_candidate(server):
    payload = max(payloads(server["root"] / "data", 8, seed=4),
                  key=lambda p: len(p["history"]["item_id"]))
    body = _post(server, {**payload, "explain": True}).json()
    _, weights = offline_scores(server["run"] / "checkpoint", payload)
    n = len(payload["history"]["item_id"])
    assert body["explain"]["history_used"] == n and body["explain"]["history_dropped"] == 0
    np.testing.assert_allclose(body["explain"]["weights"], weights, atol=1e-5)
    assert body["model"]["name"] == "din"


def test_model_info_and_health(server):
    info = _model_info(server)
    assert info["schema"]["name"] == "tiny"
    assert info["vocab_sizes"] == {"item_id": 30, "cate_id": 6}
    assert "valid_gauc" in info["metrics"]
    assert info["model"]["checkpoint"].endswith("checkpoint")
    assert info["serving"]["max_batch_size"] == 64
    assert info["serving"]["device"] == "cpu"  # no GPU given to the replica
    health = requests.get(f"{server['url']}/healthz", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["model"]["version"] == info["model"]["version"]


def test_bad_input_gets_4xx_naming_the_field_and_serving_continues(server):
    for body, status, field in BAD_REQUESTS:
        r = _post(server, body)
        assert r.status_code == status, (field, r.text)
        assert r.json()["error"]["field"] == field, r.text
    # Bodies declared too large are refused before they are read.
    r = _post(server, b"{" + b" " * 5000 + b"}")
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    assert _post(server, payloads(server["root"] / "data", 1)[0]).status_code == 200


def test_concurrent_requests_are_merged_into_batches(server):
    before = _stats(server)
    bodies = payloads(server["root"] / "data", 24, candidates=4, seed=9)
    for _ in range(3):  # batches need requests in flight together; retry a burst if unlucky
        asyncio.run(_burst(server["url"], bodies))
        stats = _stats(server)
        if stats["max_requests_per_batch"] > 1:
            break
    assert stats["replica"] == before["replica"]
    assert stats["max_requests_per_batch"] > 1, stats
    assert stats["max_candidates_per_batch"] <= 64  # candidates, not requests, are counted
    new = stats["recent_batches"][-(stats["batches"] - before["batches"]):]
    assert sum(b["candidates"] for b in new) == stats["candidates"] - before["candidates"]


def test_reconfigure_changes_batch_size_without_restart(server):
    before = _stats(server)
    serve_deploy.deploy(serve_deploy.app_config(server["args"], port=server["port"], user_config={
        "max_batch_size": 8, "batch_wait_timeout_s": 0.05}))
    after = _stats(server)
    assert after["max_batch_size"] == 8 and after["batch_wait_timeout_s"] == 0.05
    assert after["replica"] == before["replica"]  # same process: reconfigured, not restarted
    assert after["batches"] == before["batches"]
    asyncio.run(_burst(server["url"], payloads(server["root"] / "data", 24, candidates=4)))
    stats = _stats(server)
    new = stats["recent_batches"][-(stats["batches"] - after["batches"]):]
    assert new and max(b["candidates"] for b in new) <= 8, new
    # A request larger than the batch size is still served, alone and unsplit.
    big = payloads(server["root"] / "data", 1, candidates=8)[0]
    assert len(_post(server, big).json()["scores"]) == 8
    serve_deploy.deploy(serve_deploy.app_config(server["args"], port=server["port"], user_config={
        "max_batch_size": 1, "batch_wait_timeout_s": 0.0}))
    asyncio.run(_burst(server["url"], payloads(server["root"] / "data", 8, candidates=3)))
    stats = _stats(server)
    assert stats["max_batch_size"] == 1 and stats["recent_batches"][-1]["requests"] == 1
    assert all(b["requests"] == 1 for b in stats["recent_batches"][-8:])


@pytest.fixture(scope="module")
def predicted(server) -> dict:
    """`din-ray predict` (in this process) of the test split for DIN (the served checkpoint)
    and DeepFM (trained here): model -> (train output, predictions table)."""
    root = server["root"]
    runs = {"din": server["run"], "deepfm": train_tiny(root, "deepfm")}
    out = {}
    for name, run in runs.items():
        predict(PredictConfig(checkpoint=str(run), data=str(root / "data"),
                              output=str(root / f"pred-{name}"), engine="local"))
        out[name] = (run, read_predictions(root / f"pred-{name}"))
    return out


def _sorted_rows(table, schema) -> dict[str, np.ndarray]:
    """Prediction rows in an order fixed by their content (Ray Data keeps no file order)."""
    rows = to_arrays(table, schema)
    columns = [rows[k].reshape(len(rows[CTR]), -1) for k in sorted(rows) if k != CTR]
    keys = np.concatenate(columns, axis=1)
    order = np.lexsort(keys.T[::-1])
    return {k: v[order] for k, v in rows.items()}


def test_ray_data_predictions_equal_in_process(server, predicted, tmp_path):
    run, local = predicted["din"]
    data = server["root"] / "data"
    # Half a CPU per actor: the cluster's 4 CPUs also hold the Serve replica and the reads.
    summary = predict(PredictConfig(checkpoint=str(run), data=str(data),
                                    output=str(tmp_path / "pred"), engine="ray", actors=2,
                                    cpus_per_actor=0.5, batch_size=16))
    assert summary["engine"] == "ray" and summary["rows"] == local.num_rows
    schema = PreparedDataset.open(data).schema
    mine, ref = _sorted_rows(read_predictions(tmp_path / "pred"), schema), _sorted_rows(local,
                                                                                        schema)
    for key, value in ref.items():
        if key != CTR:
            np.testing.assert_array_equal(mine[key], value, err_msg=key)
    np.testing.assert_allclose(mine[CTR], ref[CTR], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def deepfm_url(server, predicted) -> str:
    """A second application on the running Serve instance: DeepFM under /deepfm."""
    config = serve_deploy.app_config(server["args"], port=server["port"], user_config={
        "max_batch_size": 64, "batch_wait_timeout_s": 0.05})
    din_app = config["applications"][0]
    config["applications"].append({
        **din_app, "name": "deepfm", "route_prefix": "/deepfm",
        "args": {**din_app["args"], "checkpoint": str(predicted["deepfm"][0])}})
    serve_deploy.deploy(config)
    return f"{server['url']}/deepfm"


@pytest.mark.parametrize("model", [
    "din", "deepfm"])
def test_served_ctrs_equal_offline_predictions(server, predicted, deepfm_url, model):
    # Requests carry RAW item ids, mapped through the dataset's vocabulary (categories are
    # dense ids: the tiny data has none), one candidate per sampled test row.
    _, table = predicted[model]
    data = server["root"] / "data"
    rows = to_arrays(table, PreparedDataset.open(data).schema)
    raw = raw_items(data)
    url = server["url"] if model == "din" else deepfm_url
    sample = np.random.default_rng(3).choice(len(rows[CTR]), 12, replace=False)
    served = []
    for i in sample:
        real = rows["hist_item_id"][i] != PAD_ID
        body = {"history": {"item_id": [raw[int(h)] for h in rows["hist_item_id"][i][real]],
                            "cate_id": [int(c) for c in rows["hist_cate_id"][i][real]]},
                "candidates": [{"item_id": raw[int(rows["item_id"][i])],
                                "cate_id": int(rows["cate_id"][i])}]}
        r = requests.post(f"{url}/v1/ctr", json=body, timeout=60, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == model
        served.extend(r.json()["scores"])
    np.testing.assert_allclose(served, rows[CTR][sample], rtol=0, atol=1e-5)


def test_config_yaml_and_cli_config_are_valid_serve_configs(tmp_path):
    import argparse
    from importlib import import_module

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from din_ray.cli import serve as serve_cli
    from din_ray.resources import SERVE_CONFIG, resource_path

    packaged = resource_path(SERVE_CONFIG)
    repo_copy = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"
    assert repo_copy.read_text() == packaged.read_text(), "serve/config.yaml: copy the packaged one"
    config = ServeDeploySchema.model_validate(yaml.safe_load(packaged.read_text()))
    (din,) = config.applications
    assert din.import_path == "din_ray.serve.app:build_app"
    module, name = din.import_path.split(":")
    assert getattr(import_module(module), name) is app.build_app
    ServeArgs.model_validate(din.args)  # what Serve does with a typed builder's args
    (deployment,) = din.deployments
    assert deployment.autoscaling_config["max_replicas"] > 1
    # The proxy answers a request it cannot serve in time (no live replica) instead of holding it.
    assert config.http_options.request_timeout_s == REQUEST_TIMEOUT_S

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--checkpoint", str(tmp_path), "--max-batch-size",
                              "2048", "--batch-wait-ms", "5"])
    assert args.host == "127.0.0.1"
    built = ServeDeploySchema.model_validate(serve_cli.app_config(args, tmp_path))
    (deployment,) = built.applications[0].deployments
    assert deployment.user_config == {"max_batch_size": 2048, "batch_wait_timeout_s": 0.005}
    assert built.http_options.host == "127.0.0.1"
    assert built.http_options.request_timeout_s == REQUEST_TIMEOUT_S
    args = parser.parse_args(["serve", "--checkpoint", str(tmp_path), "--request-timeout-s", "2"])
    assert ServeDeploySchema.model_validate(serve_cli.app_config(args, tmp_path)) \
        .http_options.request_timeout_s == 2
    assert built.applications[0].args["max_ongoing_requests"] == 2048
    # The CLI's defaults are ServeArgs' (one place): unset flags leave them.
    defaults = ServeArgs(checkpoint=str(tmp_path))
    default_args = serve_cli.serve_args(parser.parse_args(["serve", "--checkpoint",
                                                          str(tmp_path)]), tmp_path)
    assert default_args == defaults

    # --gpus-per-replica: GPUs reserved per replica and the GPU batching defaults.
    args = parser.parse_args(["serve", "--checkpoint", str(tmp_path), "--gpus-per-replica", "1"])
    gpu_app = serve_cli.app_config(args, tmp_path)["applications"][0]
    assert gpu_app["args"]["gpus_per_replica"] == 1
    assert gpu_app["deployments"][0]["user_config"] == {
        "max_batch_size": GPU_MAX_BATCH_SIZE, "batch_wait_timeout_s": GPU_BATCH_WAIT_S}
    assert app._actor_options(1)["num_gpus"] == 1 and "num_gpus" not in app._actor_options(0)
    with pytest.raises(ValueError, match="max_batch\n  Extra inputs are not permitted"):
        app.build_app({"checkpoint": str(tmp_path), "max_batch": 3})
    with pytest.raises(ValueError, match="unknown user_config keys"):
        BatchingConfig.from_dict({"max_batch_size": 8, "wait": 1})
    # Strings (`serve run ... key=value`) are converted by the typed builder's model.
    assert ServeArgs.model_validate({"checkpoint": "x", "max_batch_size": "512",
                                     "gpus_per_replica": "1"}).batching() == BatchingConfig(
        max_batch_size=512, batch_wait_timeout_s=GPU_BATCH_WAIT_S)


def test_every_endpoint_but_healthz_needs_the_token(server):
    url = server["url"]
    body = json.dumps(payloads(server["root"] / "data", 1)[0]).encode()
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        for r in (requests.post(f"{url}/v1/ctr", data=body, headers=headers, timeout=60),
                  requests.get(f"{url}/v1/model", headers=headers, timeout=60),
                  requests.get(f"{url}/v1/stats", headers=headers, timeout=60)):
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["field"] == "authorization"
    assert requests.get(f"{url}/healthz", timeout=60).status_code == 200
    assert _post(server, body).status_code == 200
    r = requests.get(f"{url}/v2/nothing", headers=AUTH, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["field"] == "path"
    r = requests.get(f"{url}/v1/ctr", headers=AUTH, timeout=60)
    assert r.status_code == 405 and r.json()["error"]["field"] == "method"


def _grpc_score(server, body: bytes, metadata=(("authorization", f"Bearer {TOKEN}"),)):
    """One call of din_ray.CTR/Score: (gRPC status code, the response or error JSON). The
    `application` metadata names the app: this module's Serve also runs a DeepFM app."""
    import grpc

    metadata = (*metadata, ("application", serve_deploy.APP_NAME))
    with grpc.insecure_channel(server["grpc"]) as channel:
        try:
            reply = channel.unary_unary(grpc_api.METHOD)(body, metadata=metadata, timeout=60)
        except grpc.RpcError as e:
            return e.code(), json.loads(e.details())
        return grpc.StatusCode.OK, json.loads(reply)


def test_grpc_ingress_scores_equal_the_http_endpoints(server):
    """The same JSON body through Serve's gRPC proxy and through its HTTP proxy: the same
    response, explain included."""
    import grpc

    for payload in payloads(server["root"] / "data", 4, seed=13):
        for body in (payload, {**payload, "explain": True}):
            data = json.dumps(body).encode()
            code, reply = _grpc_score(server, data)
            assert code == grpc.StatusCode.OK, reply
            assert reply == _post(server, data).json()


def test_grpc_ingress_refusals_name_the_field_and_serving_continues(server):
    """Every bad request of the HTTP test, a body over the limit and a missing or wrong token
    get the gRPC code matching the HTTP status, with the same error JSON as details."""
    import grpc

    for body, status, field in BAD_REQUESTS + [(b"{" + b" " * 5000 + b"}", 413, "body")]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        code, reply = _grpc_score(server, data)
        assert code == grpc_api.STATUS_CODES[status], (field, code, reply)
        assert reply["error"]["field"] == field, reply
    good = json.dumps(payloads(server["root"] / "data", 1)[0]).encode()
    for metadata in ((), (("authorization", "Bearer wrong-token-0123456789"),),
                     (("authorization", TOKEN),)):
        code, reply = _grpc_score(server, good, metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED and reply["error"]["field"] == \
            "authorization"
    assert _grpc_score(server, good)[0] == grpc.StatusCode.OK


def test_fuzzed_bodies_never_get_a_5xx_and_the_replica_survives(server):
    """Hostile bodies over real HTTP (valid ones mutated at every position and type, raw byte
    edits, pathological JSON): every answer is 200 or a 4xx JSON error naming a field, and the
    same replica process still serves afterwards."""
    hypothesis = pytest.importorskip("hypothesis")
    bodies, pathological = fuzz_strategies()
    valid = payloads(server["root"] / "data", 4, candidates=3, seed=11)
    before = _stats(server)["replica"]
    statuses: list[int] = []
    session = requests.Session()
    session.headers.update(AUTH)

    def check(body: bytes) -> None:
        r = session.post(f"{server['url']}/v1/ctr", data=body, timeout=60)
        statuses.append(r.status_code)
        assert r.status_code == 200 or 400 <= r.status_code < 500, (body[:200], r.text[:300])
        if r.status_code == 200:
            assert len(r.json()["scores"]) >= 1
        else:
            assert isinstance(r.json()["error"]["field"], str), r.text[:300]

    for body in pathological(valid):
        check(body)
    hypothesis.settings(max_examples=800, deadline=None, database=None, derandomize=True)(
        hypothesis.given(bodies(valid))(check))()
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"fuzzed the Serve app with {len(statuses)} requests: statuses {counts}")
    assert len(statuses) > 800 and counts.get(200, 0) > 0
    assert requests.get(f"{server['url']}/healthz", timeout=60).status_code == 200
    assert _stats(server)["replica"] == before  # the same process: nothing crashed it
    assert _post(server, valid[0]).status_code == 200


def test_binding_beyond_loopback_needs_a_token_or_insecure(tmp_path):
    import argparse

    from din_ray.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())

    def config(*argv: str) -> dict:
        args = parser.parse_args(["serve", "--checkpoint", str(tmp_path), *argv])
        return serve_cli.app_config(args, tmp_path)["applications"][0]["args"]

    assert "token_sha256" not in config()  # loopback: open unless a token is given
    with pytest.raises(ValueError, match="--token-file or \\$DIN_RAY_SERVE_TOKEN"):
        config("--host", "0.0.0.0")
    assert "token_sha256" not in config("--host", "0.0.0.0", "--insecure")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    assert config("--host", "0.0.0.0", "--token-file", str(token))["token_sha256"] == digest
    token.write_text("short")
    with pytest.raises(ValueError, match="at least 16"):
        config("--host", "10.1.2.3", "--token-file", str(token))
    # Serve's gRPC proxy listens on every interface: --grpc-port needs a token like a wide host.
    with pytest.raises(ValueError, match="--grpc-port 9000: .*every interface"):
        config("--grpc-port", "9000")
    assert "token_sha256" not in config("--grpc-port", "9000", "--insecure")
    token.write_text(TOKEN)
    assert config("--grpc-port", "9000", "--token-file", str(token))["token_sha256"] == digest
    assert serve_cli.access_token("::1", None, False, environ={}) is None
    assert serve_cli.access_token("example.com", None, False,
                                  environ={"DIN_RAY_SERVE_TOKEN": TOKEN}) == TOKEN
    with pytest.raises(ValueError, match="token_sha256 must be"):
        app.build_app({"checkpoint": str(tmp_path), "token_sha256": "abc"})
    assert ServeArgs(checkpoint="x", token_sha256=digest.upper()).token_sha256 == digest


async def _stream(url: str, bodies: list[dict], stop: asyncio.Event, limit: int,
                  clients: int = 4) -> list[tuple[int, str | None]]:
    """`clients` loops posting `bodies` round-robin until `stop` (or `limit` requests in all):
    (status, model version) per request."""
    seen: list[tuple[int, str | None]] = []
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async def client(k: int) -> None:
            i = k
            while not stop.is_set() and len(seen) < limit:
                async with session.post(f"{url}/v1/ctr", json=bodies[i % len(bodies)]) as r:
                    body = await r.json() if r.status == 200 else None
                    seen.append((r.status, body["model"]["version"] if body else None))
                i += clients
        await asyncio.gather(*(client(k) for k in range(clients)))
    return seen


def test_swap_to_a_promoted_checkpoint_under_load_fails_no_request(server):
    """A steady stream of requests while the app switches checkpoints (user_config.checkpoint,
    an in-place update): every request succeeds, answered by the old or the new version, and
    afterwards /v1/model and the scores are the new checkpoint's."""
    from din_ray.serve.scoring import checkpoint_version

    new_run = train_tiny(server["root"], "din", name="din-day2", seed=2)
    old = _model_info(server)["model"]["version"]
    new = checkpoint_version(new_run / "checkpoint")
    assert new != old
    bodies = payloads(server["root"] / "data", 16, candidates=4, seed=11)
    config = serve_deploy.app_config(server["args"], port=server["port"], user_config={
        "max_batch_size": 64, "batch_wait_timeout_s": 0.01})

    async def swap_during_stream() -> list[tuple[int, str | None]]:
        stop = asyncio.Event()
        stream = asyncio.create_task(_stream(server["url"], bodies, stop, limit=1500))
        await asyncio.sleep(1.0)  # requests flowing before the swap
        await asyncio.to_thread(serve_deploy.deploy,
                                serve_deploy.with_checkpoint(config, new_run))
        await asyncio.sleep(1.0)  # and after it
        stop.set()
        return await stream

    seen = asyncio.run(swap_during_stream())
    errors = [s for s, _ in seen if s != 200]
    assert not errors, f"{len(errors)} of {len(seen)} requests failed: {errors[:5]}"
    versions = [v for _, v in seen]
    assert versions[0] == old and versions[-1] == new, (versions[0], versions[-1])
    assert set(versions) == {old, new}
    info = _model_info(server)
    assert info["model"]["version"] == new
    offline, _ = offline_scores(new_run / "checkpoint", bodies[0])
    np.testing.assert_allclose(_post(server, bodies[0]).json()["scores"], offline, atol=1e-5)
    # Back to the built checkpoint, as the rest of the module expects.
    serve_deploy.deploy(config)
    assert _model_info(server)["model"]["version"] == old


def test_deploys_send_rays_token_where_ray_looks_for_it(tmp_path, monkeypatch):
    """The Serve REST API of a cluster with token authentication needs Ray's token: taken from
    $RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH's file, else ~/.ray/auth_token; none when
    RAY_AUTH_MODE=disabled or no token exists."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert serve_deploy._ray_auth_header() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert serve_deploy._ray_auth_header() == {"Authorization": "Bearer home-token"}
    (tmp_path / "file").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "file"))
    assert serve_deploy._ray_auth_header() == {"Authorization": "Bearer path-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert serve_deploy._ray_auth_header() == {"Authorization": "Bearer env-token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert serve_deploy._ray_auth_header() == {}


def test_finding_the_dashboard_keeps_the_callers_sigterm_handler(server):
    """`din-ray serve` stops on SIGTERM through its own handler; asking ray.init for the
    dashboard (a Ray connected by other code) must not put back Ray's, which exits at once."""
    import signal

    from din_ray import ray_session

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    remembered = dict(ray_session._dashboard)
    try:
        ray_session._dashboard.clear()  # as if other code had connected this process
        assert ray_session.dashboard_url().startswith("http://127.0.0.1:")
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray_session._dashboard.update(remembered)
