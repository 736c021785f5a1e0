"""The test-only fault hook (din_ray.train.faults) is off unless the driver's environment
plans a fault, and a planned fault fires once: in its own process, at its point only."""

import json
import multiprocessing

import pytest

from din_ray.train.faults import FAULTS_ENV, FaultInjector, plans_from_env


def test_no_faults_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    assert plans_from_env() == []


def test_plans_are_validated_and_accept_one_or_a_list(monkeypatch, tmp_path):
    plan = {"epoch": 1, "step": 0, "marker": str(tmp_path / "m")}
    monkeypatch.setenv(FAULTS_ENV, json.dumps(plan))
    assert plans_from_env() == [{**plan, "rank": None, "phase": "train"}]
    monkeypatch.setenv(FAULTS_ENV, json.dumps([plan, {**plan, "phase": "eval"}]))
    assert [p["phase"] for p in plans_from_env()] == ["train", "eval"]
    monkeypatch.setenv(FAULTS_ENV, json.dumps({**plan, "phase": "lunch"}))
    with pytest.raises(ValueError, match="phase must be one of"):
        plans_from_env()


def _run(plans, marker=None):
    injector = FaultInjector(plans, rank=1)
    list(injector.around(iter(range(3)), epoch=0))  # exits at step 1 if planned for rank 1


def test_a_planned_fault_exits_its_process_once(tmp_path):
    marker = tmp_path / "m"
    plans = [{"epoch": 1, "step": 1, "marker": str(marker), "rank": 1, "phase": "train"}]
    ctx = multiprocessing.get_context("spawn")
    first = ctx.Process(target=_run, args=(plans, marker))
    first.start()
    first.join(60)
    assert first.exitcode == 1 and marker.read_text() == "rank 1 epoch 1 step 1"
    second = ctx.Process(target=_run, args=(plans, marker))  # the restarted worker carries on
    second.start()
    second.join(60)
    assert second.exitcode == 0
    other_rank = [{**plans[0], "rank": 0, "marker": str(tmp_path / "n")}]
    _run(other_rank, None)  # not this rank: no exit here
    assert not (tmp_path / "n").exists()
