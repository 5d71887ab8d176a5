"""The CUDA paths: resident data on a GPU, vectorised groups on a GPU, the --gpus-per-trial auto
probe, and a study packing two trials onto one GPU through Ray.

They run only where torch sees a GPU (CI has none: there they are skipped with that reason).
On a lent GPU machine: ``pytest tests/test_gpu.py`` (about two minutes).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FixedTrial

from hpo import api
from hpo.api import Execution
from hpo.data.batches import ResidentBatches, make_loaders
from hpo.models.nets import build_net
from hpo.running.group import group_net, run_group
from hpo.running.harness import TrialResult
from hpo.running.packing import Probe
from hpo.running.trial import run_trial
from hpo.space import baseline_params, suggest
from hpo.spec import ObjectiveSpec, parse_spec
from hpo.tracking import Tracking

from .conftest import TINY_SPEC, mlp_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VAL_ACC = [ObjectiveSpec(metric="val/acc", direction="maximize")]
GPU = torch.device("cuda", 0)


def test_small_data_is_resident_on_the_gpu_and_batches_are_sliced_there(digits):
    train, val = make_loaders(digits, 64, 512, seed=0, device=GPU)
    assert isinstance(train, ResidentBatches) and isinstance(val, ResidentBatches)
    x, y = next(iter(train))
    assert x.device.type == y.device.type == "cuda" and len(y) == 64


def test_a_trial_on_the_gpu_learns_as_on_the_cpu(digits):
    spec = parse_spec(TINY_SPEC)
    config = suggest(FixedTrial(baseline_params(spec, "recommended")), spec, seed=5)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=4))
    gpu = run_trial(config, digits, VAL_ACC, accelerator="gpu")
    cpu = run_trial(config, digits, VAL_ACC, accelerator="cpu")
    assert gpu.summary["test_acc"] == pytest.approx(cpu.summary["test_acc"], abs=0.03)


def test_a_group_on_the_gpu_computes_each_members_solo_network(digits):
    configs = [mlp_config(s, units=64, rates=(0.2, 0.5), epochs=3) for s in (1, 2, 3)]
    group = group_net(configs, digits).to(GPU).eval()
    x = digits.val.x[:50].to(GPU)
    out = group(x)
    for k, config in enumerate(configs):
        solo = build_net(config.net, config.dropout, digits.input_shape, digits.num_classes)
        solo.load_state_dict(group.member_state(k))
        assert torch.allclose(out[k], solo.to(GPU).eval()(x), atol=1e-4)


def test_members_trained_on_the_gpu_follow_their_solo_gpu_runs(digits):
    members = [
        mlp_config(1, units=64, epochs=3, max_norm=0.8),
        mlp_config(2, units=64, epochs=3, lr=0.15),
        mlp_config(3, units=64, epochs=3, lr=0.02, max_norm=2.0),
    ]
    group = run_group(members, digits, VAL_ACC, accelerator="gpu")
    for config, member in zip(members, group):
        solo = run_trial(config, digits, VAL_ACC, accelerator="gpu")
        assert isinstance(member, TrialResult)
        assert [h["val/loss"] for h in member.history] == pytest.approx([h["val/loss"] for h in solo.history], abs=1e-3)


def test_the_probe_measures_a_footprint_and_a_busy_fraction_on_this_gpu(tmp_path):
    """In a fresh process, as in its Ray task: the GPU's memory growth is the probe's own."""
    script = """
import dataclasses, json
from hpo.data import DataSpec, load_data
from hpo.running.packing import probe
from tests.conftest import mlp_config
from tests.test_gpu import VAL_ACC
configs = [mlp_config(s, units=64, epochs=3) for s in range(4)]
print(json.dumps(dataclasses.asdict(probe(configs, load_data(DataSpec()), VAL_ACC))))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = Probe(**json.loads(done.stdout.strip().splitlines()[-1]))
    assert measured.device
    assert 100 * 2**20 < measured.footprint_bytes < measured.total_bytes / 4
    assert 0 < measured.utilization <= 1
    assert 4 < measured.seconds < 120


def test_a_study_packs_trials_onto_the_gpu_with_auto(write_spec, tmp_path):
    """DESIGN's cluster case on one GPU: --gpus-per-trial auto probes, then trials share the GPU."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        notes: list[str] = []
        storage = f"sqlite:///{tmp_path / 's.db'}"
        name = f"gpu-{uuid.uuid4().hex[:8]}"
        _, summary = api.submit(
            write_spec(),
            trials=8,
            study_name=name,
            storage=storage,
            on_note=notes.append,
            tracking=Tracking(enabled=False),
            execution=Execution(workers=3, cpus_per_trial=1, gpus_per_trial="auto"),
        )
    finally:
        ray.shutdown()
    assert summary.counts.finished == 8
    assert any(note.startswith("--gpus-per-trial auto") and "per GPU" in note for note in notes), notes
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert {tuple(t.user_attrs["worker"]["gpus"]) for t in trials} == {("0",)}
    assert any(
        a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        for a in trials
        for b in trials
        if a.number < b.number
    ), "two trials shared the GPU at once"
