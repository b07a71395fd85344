"""The command line: train (synthetic data, tiny settings) → eval → predict (with attention
pictures), convert, bench, overrides and error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "dab_detr_r18_tiny.pt")

SMALL = ["synthetic_train=6", "synthetic_val=3", "epochs=1", "batch_size=3", "threads=1", "aug_scale=0.2",
         "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1", "model.dec_layers=2",
         "model.dim_feedforward=64", "model.num_queries=10", "model.num_select=10"]


def dabdetr(*args, timeout=240, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dabdetr", *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    args = ["train", "--synthetic-dir", str(tmp / "shapes"), "--out", str(tmp / "run"), "--no-progress", "--vis", "2"]
    for s in SMALL:
        args += ["--set", s]
    r = dabdetr(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r


def test_train_without_data_generates_shapes_and_reports(trained):
    tmp, r = trained
    assert "generating the synthetic shapes dataset" in r.stdout
    assert "training tiny" in r.stdout and "AP50" in r.stdout and r.stdout.count("| AR (") == 6
    for f in ("run/checkpoint.pth", "run/eval.json", "run/log.jsonl", "run/predictions.png",
              "shapes/annotations/train.json", "shapes/annotations/val.json"):
        assert os.path.exists(tmp / f), f
    ev = json.load(open(tmp / "run" / "eval.json"))
    assert len(ev["stats"]) == 12 and "AP50" in ev["metrics"]
    log = [json.loads(line) for line in open(tmp / "run" / "log.jsonl")]
    assert log[0]["type"] == "start" and log[-1]["type"] == "epoch" and "val_AP50" in log[-1]


def test_eval_and_predict_with_attention(trained):
    tmp, _ = trained
    ck = str(tmp / "run" / "checkpoint.pth")
    r = dabdetr("eval", ck, "--synthetic-dir", str(tmp / "shapes"), "--no-progress", "--out", str(tmp / "ev.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AP50" in r.stdout and os.path.exists(tmp / "ev.json")
    img = str(tmp / "shapes" / "val" / "000000.png")
    r = dabdetr("predict", ck, img, "--out", str(tmp / "pred"), "--threshold", "0", "--attention", "--top", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(tmp / "pred"))
    assert "000000_pred.png" in files and "predictions.json" in files
    assert len([f for f in files if "_attn_q" in f]) == 2
    dets = json.load(open(tmp / "pred" / "predictions.json"))[img]
    assert dets and {"label", "name", "score", "box_xyxy"} <= set(dets[0])
    assert dets[0]["name"] in ("circle", "rectangle", "triangle", "0")


def test_resume_of_finished_run_only_evaluates(trained):
    tmp, _ = trained
    args = ["train", "--synthetic-dir", str(tmp / "shapes"), "--out", str(tmp / "run"), "--no-progress", "--vis", "0",
            "--resume"]
    for s in SMALL:
        args += ["--set", s]
    r = dabdetr(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "AP50" in r.stdout


def test_overrides_and_errors(tmp_path):
    r = dabdetr("train", "--set", "lr=3e-4", "--set", "hidden_dim=64", "--epochs", "2", "--print-config")
    cfg = json.loads(r.stdout)
    assert cfg["lr"] == 3e-4 and cfg["model"]["hidden_dim"] == 64 and cfg["epochs"] == 2 and cfg["preset"] == "tiny"
    r = dabdetr("train", "--set", "no_such_thing=1", "--print-config")
    assert r.returncode != 0 and "unknown setting 'no_such_thing'" in r.stderr
    # bad data: a message naming the file, no traceback
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "gone.png"}], "annotations": [], "categories": [{"id": 1}]}))
    r = dabdetr("train", "--data", str(tmp_path), "--preset", "tiny", "--no-progress")
    assert r.returncode == 2 and "gone.png" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.exists(FIXTURE), reason="the shared original-format fixture is not present")
def test_convert_original_fixture(tmp_path):
    r = dabdetr("convert", FIXTURE, str(tmp_path / "ours.pth"))
    assert r.returncode == 0, r.stderr[-3000:]
    obj = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert obj["format"] == "dabdetr-v1"


def test_bench_forwards_to_bench_ops():
    r = dabdetr("bench", "--help")
    assert r.returncode == 0 and "--quick" in r.stdout


def test_bench_model_and_ops_subcommands():
    r = dabdetr("bench", "model", "--help")
    assert r.returncode == 0 and "--case" in r.stdout and "train step" in r.stdout
    r = dabdetr("bench", "ops", "--help")
    assert r.returncode == 0 and "--memory-only" in r.stdout
