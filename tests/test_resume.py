"""Exact resume: a run killed with SIGKILL mid-epoch (and one killed in the middle of writing a
checkpoint) and resumed ends with exactly the parameters of an uninterrupted run; the checkpoint on
disk is never a partial file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from dabdetr.data import ShapesConfig, generate_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS = ["preset=tiny", "epochs=2", "lr_drop=1", "lr_schedule=cosine", "warmup_iters=3", "batch_size=2", "checkpoint_every=2", "workers=0", "threads=1",
            "aug_scale=0.3", "eval_batch_size=4", "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1",
            "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=10", "model.num_select=10"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    cfg = ShapesConfig(min_side=64, max_side=112)
    generate_shapes(str(root), 10, seed=7, split="train", config=cfg)
    generate_shapes(str(root), 2, seed=8, split="val", config=cfg)
    return str(root)


def _train(data, out, env_extra=None, resume=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "dabdetr", "train", "--data", data, "--out", out, "--no-progress", "--vis", "0"]
    for s in SETTINGS:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _state(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)


def _assert_same(a, b):
    assert a["epoch"] == b["epoch"] == 2 and a["iteration"] == b["iteration"] == 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    r = _train(data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return _state(out)


def test_sigkill_mid_epoch_then_resume_is_exact(data, reference, tmp_path):
    out = str(tmp_path / "run")
    # epoch 1 has 5 iterations; checkpoints at 2 and 4: killed after the step of iteration 3
    r = _train(data, out, {"DABDETR_DEBUG_KILL_AT_ITER": "1:3"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    ck = _state(out)
    assert (ck["epoch"], ck["iteration"]) == (1, 2)
    r = _train(data, out, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "epoch 1, iteration 2" in r.stdout
    _assert_same(_state(out), reference)


def test_kill_while_writing_checkpoint_leaves_previous_one(data, reference, tmp_path):
    out = str(tmp_path / "run")
    # saves: (0,2) (0,4) (1,0) (1,2) ... — killed half-way through writing the 3rd
    r = _train(data, out, {"DABDETR_DEBUG_KILL_IN_SAVE": "3"})
    assert r.returncode == -signal.SIGKILL
    leftovers = [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert leftovers, "the partial write should be a temporary file"
    ck = _state(out)  # the visible checkpoint is complete and loads
    assert (ck["epoch"], ck["iteration"]) == (0, 4)
    r = _train(data, out, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    _assert_same(_state(out), reference)
