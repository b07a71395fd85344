"""DDP through ``torchrun --nproc_per_node=2`` (gloo, CPU): the same parameters as one process with
the same global batch (plain SGD), and a clean exit (no SIGABRT at process exit)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dabdetr.data import ShapesConfig, generate_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS = ["preset=tiny", "optimizer=sgd", "lr=0.01", "lr_backbone=0.01", "epochs=1", "lr_drop=100",
            "clip_max_norm=0", "batch_size=4", "workers=0", "threads=1", "aug_scale=1", "train_scales=[64]",
            "max_size=64", "val_size=64", "crop_prob=0", "eval_batch_size=4",
            "model.backbone_norm=frozen", "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1",
            "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=10", "model.num_select=10"]


def _run(cmd, env_extra=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_data")
    cfg = ShapesConfig(min_side=64, max_side=64)  # equal sizes: padding is the same in 1 and 2 processes
    generate_shapes(str(root), 12, seed=3, split="train", config=cfg)
    generate_shapes(str(root), 4, seed=4, split="val", config=cfg)
    return str(root)


def _train_args(data, out):
    args = ["train", "--data", data, "--out", out, "--no-progress", "--vis", "0"]
    for s in SETTINGS:
        args += ["--set", s]
    return args


def _params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_ddp_two_processes_match_one_process(data, tmp_path):
    single = _run([sys.executable, "-m", "dabdetr"] + _train_args(data, str(tmp_path / "one")))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dabdetr"]
               + _train_args(data, str(tmp_path / "two")))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "terminate called" not in ddp.stderr and "SIGABRT" not in ddp.stderr
    assert "2 process(es)" in ddp.stdout
    a, b = _params(tmp_path / "one" / "checkpoint.pth"), _params(tmp_path / "two" / "checkpoint.pth")
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        scale = max(a[k].abs().max().item(), 1e-3)
        assert (a[k] - b[k]).abs().max().item() <= 1e-4 * scale, k
    assert "AP50" in ddp.stdout and "AP50" in single.stdout
