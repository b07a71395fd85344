"""Trainer pieces: bf16 autocast step vs float32, float32 matcher inputs, NaN stop, an epoch with
checkpoints, COCO evaluation, atomic checkpoints and the pictures."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from PIL import Image

from dabdetr import checkpointing
from dabdetr.coco_eval import STAT_NAMES, coco_evaluate, format_table, save_json
from dabdetr.data import CocoDetection, build_loader, detr_val_transforms, generate_shapes
from dabdetr.data.coco import load_coco_json
from dabdetr.engine import (NonFiniteLossError, autocast, build_optimizer, evaluate, make_scaler, train_one_epoch,
                            _to_float)
from dabdetr.models import DABDETR, get_config

SMALL = dict(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=12, num_classes=4,
             num_select=20)


def small_model(**kw):
    torch.manual_seed(0)
    return DABDETR(get_config("tiny", **{**SMALL, **kw}), backend="torch")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("eng")
    from dabdetr.data import ShapesConfig

    cfg = ShapesConfig(min_side=64, max_side=96)
    ann = generate_shapes(str(root), 8, seed=2, split="train", config=cfg)
    return CocoDetection(str(root / "train"), ann, detr_val_transforms(scale=0.1))


def _batch(ds, n=4):
    from dabdetr.data import collate_fn

    return collate_fn([ds[i] for i in range(n)])


def test_bf16_step_close_to_float32_and_matcher_gets_float32(shapes):
    images, mask, targets = _batch(shapes)
    model = small_model().train()
    crit = model.build_criterion()
    seen = []
    orig = crit.matcher.forward

    def spy(outputs, tg):
        seen.append((outputs["pred_logits"].dtype, outputs["pred_boxes"].dtype))
        return orig(outputs, tg)

    crit.matcher.forward = spy
    out32 = model(images, mask)
    loss32 = crit.total(crit(out32, targets))
    with autocast(torch.device("cpu"), "bf16"):
        out16 = model(images, mask)
    assert out16["pred_logits"].dtype == torch.bfloat16  # the model really ran in bf16
    loss16 = crit.total(crit(_to_float(out16), targets))
    loss16.backward()
    assert torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) <= 0.05 * abs(loss32.item()), (loss16.item(), loss32.item())
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_train_epoch_with_checkpoints_then_nan_stops(shapes, tmp_path):
    model = small_model()
    crit = model.build_criterion()
    opt = build_optimizer(model, 1e-4, 1e-5, 1e-4)
    loader = build_loader(shapes, 2, shuffle=True, seed=0)
    path = str(tmp_path / "checkpoint.pth")
    saved = []

    def on_step(it):
        checkpointing.save_training_checkpoint(path, model, opt, None, None, 0, it)
        saved.append(it)

    stats = train_one_epoch(model, crit, loader, opt, torch.device("cpu"), 0, accum_steps=2, on_step=on_step,
                            progress=False)
    assert saved == [2, 4] and stats["loss"] > 0
    before = open(path, "rb").read()
    with torch.no_grad():
        model.class_embed.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1"):
        train_one_epoch(model, crit, loader, opt, torch.device("cpu"), 1, on_step=on_step, progress=False)
    assert open(path, "rb").read() == before  # the last checkpoint is untouched
    obj = checkpointing.load_training_checkpoint(path, small_model(), restore_rng=True)
    assert obj["iteration"] == 4 and obj["format"] == "dabdetr-v1"


def test_fp16_scaler_step_runs(shapes):
    images, mask, targets = _batch(shapes, 2)
    model = small_model()
    crit = model.build_criterion()
    opt = build_optimizer(model, 1e-4, 1e-5, 1e-4)
    scaler = make_scaler(torch.device("cpu"), "fp16")
    loader = build_loader(shapes, 2, shuffle=False)
    stats = train_one_epoch(model, crit, loader, opt, torch.device("cpu"), 0, scaler=scaler, amp="fp16",
                            progress=False, max_iters=1)
    assert stats["loss"] == stats["loss"]


def test_coco_eval_perfect_and_empty(shapes, tmp_path):
    coco = shapes.coco
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in coco.dataset["annotations"]]
    res = coco_evaluate(coco, dets)
    assert len(res["stats"]) == 12 and res["stats"][0] == pytest.approx(1.0) and res["stats"][1] == pytest.approx(1.0)
    table = format_table(res)
    assert table.count("\n| A") == 12 and "AP50" in table
    save_json(res, str(tmp_path / "e.json"))
    assert json.load(open(tmp_path / "e.json"))["metrics"]["AP50"] == pytest.approx(1.0)
    assert coco_evaluate(coco, [])["stats"] == [0.0] * 12
    assert len(STAT_NAMES) == 12


def test_evaluate_runs_model(shapes):
    model = small_model().eval()
    loader = build_loader(shapes, 4, shuffle=False)
    res = evaluate(model, loader, torch.device("cpu"), progress=False)
    assert len(res["stats"]) == 12 and res["detections"] > 0


def test_atomic_save_never_leaves_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pth")
    checkpointing.atomic_save({"a": torch.ones(3)}, path)

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpointing.atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.pth"]


def test_rng_state_roundtrip():
    import random

    import numpy as np

    s = checkpointing.capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpointing.restore_rng_state(s)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_visualize_detections_and_attention(shapes, tmp_path):
    from dabdetr.visualize import attention_figure, attention_maps, draw_detections

    model = small_model().eval()
    x, t = shapes[0]
    inter = {}
    with torch.no_grad():
        out = model(x[None], intermediates=inter)
    inter["nheads"] = model.config.nheads
    maps = attention_maps(inter, [0, 3])
    h, w = inter["feat_mask"].shape[1:]
    assert maps["positional"].shape == maps["full"].shape == (2, h, w)
    assert torch.allclose(maps["positional"].sum((1, 2)), torch.ones(2), atol=1e-4)
    img = shapes.load_image(0)
    drawn = draw_detections(img, [[2, 2, 30, 30]], [1], [0.8], {1: "circle"})
    assert drawn.size == img.size and drawn.getpixel((2, 15)) != img.getpixel((2, 15))
    fig = attention_figure(img, [2, 2, 30, 30], 1, 0.8, maps["positional"][0], maps["full"][0])
    assert fig.size[0] > 3 * img.size[0]


def test_lr_schedule_step_cosine_warmup_and_state():
    from dabdetr.engine import LRSchedule, plan_epochs

    # "step" per optimizer step gives StepLR's per-epoch factors
    step = LRSchedule("step", steps_per_epoch=5, epochs=6, lr_drop=2, gamma=0.1)
    assert [step(n) for n in (0, 4, 5, 9, 10, 19, 20, 29)] == pytest.approx([1, 1, 1, 1, .1, .1, .01, .01])
    cos = LRSchedule("cosine", steps_per_epoch=10, epochs=3, lr_drop=1, warmup=4, min_ratio=0.05)
    expect = [min(1, (n + 1) / 4) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * n / 29))) for n in range(30)]
    assert [cos(n) for n in range(30)] == pytest.approx(expect, rel=1e-12)
    assert cos(0) == pytest.approx(0.25)
    assert cos(29) == pytest.approx(0.05) and cos(100) == pytest.approx(0.05)
    vals = [cos(n) for n in range(3, 30)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert cos(14.5) == pytest.approx(0.05 + 0.95 * 0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        LRSchedule("linear", 5, 2, 1)
    # LambdaLR saves the schedule's fields (a changed plan survives a resume)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule("cosine", 10, 8, 6))
    sch.lr_lambdas[0].set_epochs(3, 2)
    for _ in range(7):
        opt.step()
        sch.step()
    state = sch.state_dict()
    opt2 = torch.optim.SGD([p], lr=1.0)
    sch2 = torch.optim.lr_scheduler.LambdaLR(opt2, LRSchedule("cosine", 10, 8, 6))
    sch2.load_state_dict(state)
    assert sch2.lr_lambdas[0].epochs == 3 and sch2.lr_lambdas[0].lr_drop == 2 and sch2.last_epoch == 7
    # the time-budget plan: never longer than planned, never shorter than what is done
    assert plan_epochs(100.0, 10.0, 1, 50) == 10
    assert plan_epochs(100.0, 10.0, 1, 6) == 6
    assert plan_epochs(100.0, 95.0, 3, 20) == 3
    assert plan_epochs(100.0, 250.0, 5, 20) == 5
    assert plan_epochs(100.0, 0.0, 0, 20) == 20


def test_time_budget_shortens_the_run_and_resume_keeps_the_plan(tmp_path, capsys):
    from dabdetr import cpu_memory
    from dabdetr.cli import main as cli_main

    args = ["train", "--synthetic-dir", str(tmp_path / "shapes"), "--out", str(tmp_path / "run"), "--no-progress",
            "--vis", "0"]
    for s in ["synthetic_train=4", "synthetic_val=2", "epochs=4", "lr_drop=3", "batch_size=2", "threads=1",
              "aug_scale=0.2", "time_budget_min=1e-5", "lr_schedule=cosine", "warmup_iters=1", "workers=0",
              "channels_last=true", "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1",
              "model.dec_layers=1", "model.dim_feedforward=32", "model.num_queries=5", "model.num_select=5"]:
        args += ["--set", s]
    cli_main(args)
    # CPU training keeps freed memory for reuse (cpu_retain_memory, default on) where libc is glibc
    retained = "freed memory is kept for reuse" in capsys.readouterr().out
    assert retained == (cpu_memory.glibc_version() is not None) == cpu_memory.is_retaining()
    ck = torch.load(tmp_path / "run" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["scheduler"]["lr_lambdas"][0]["epochs"] == 1
    assert ck["scheduler"]["last_epoch"] == 2  # 2 optimizer steps in the one epoch
    assert ck["model"]["backbone.0.body.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [0] and "val_AP50" in log[-1]
    cli_main(args + ["--resume", "--set", "cpu_retain_memory=false"])  # nothing left to train: evaluates only
    assert "freed memory is kept for reuse" not in capsys.readouterr().out
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [0]
