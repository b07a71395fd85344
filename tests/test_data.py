"""Data: the synthetic COCO generator, the dataset and its validation, transforms, batching and
the resumable/distributed sampler."""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings

import pytest
import torch
from PIL import Image

from dabdetr.data import (CocoDetection, DataError, EpochSampler, ShapesConfig, collate_fn, detr_train_transforms,
                          detr_val_transforms, generate_shapes)
from dabdetr.data import transforms as T


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ann = generate_shapes(str(root), 24, seed=5, split="train")
    return str(root), ann


def test_synthetic_is_deterministic_and_seed_dependent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_shapes(str(a), 5, seed=3)
    generate_shapes(str(b), 5, seed=3)
    generate_shapes(str(c), 5, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_synthetic_content_follows_the_spec(shapes):
    root, ann = shapes
    data = json.load(open(ann))
    cfg = ShapesConfig()
    assert {c["id"] for c in data["categories"]} == {1, 2, 3}
    per_image = {im["id"]: 0 for im in data["images"]}
    aspects = set()
    for im in data["images"]:
        assert cfg.min_side <= im["width"] <= cfg.max_side and cfg.min_side <= im["height"] <= cfg.max_side
        with Image.open(os.path.join(root, "train", im["file_name"])) as f:
            assert f.size == (im["width"], im["height"]) and f.format == "PNG"
        aspects.add(round(im["width"] / im["height"], 1))
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for a in data["annotations"]:
        per_image[a["image_id"]] += 1
        x, y, w, h = a["bbox"]
        W, H = sizes[a["image_id"]]
        short = min(W, H)
        assert 0 <= x and x + w <= W and 0 <= y and y + h <= H
        assert 0.05 * short - 1 <= max(w, h) <= 0.5 * short + 1
        assert a["iscrowd"] == 0 and a["area"] == w * h
    assert all(1 <= n <= 6 for n in per_image.values())
    assert len({a["category_id"] for a in data["annotations"]}) == 3
    assert len(aspects) > 3


def test_dataset_items_and_num_classes(shapes):
    root, ann = shapes
    ds = CocoDetection(os.path.join(root, "train"), ann, detr_val_transforms(scale=0.25))
    assert ds.num_classes == 4 and len(ds) == 24
    x, t = ds[0]
    assert x.dtype == torch.float32 and x.shape[0] == 3 and min(x.shape[1:]) == 200
    assert t["boxes"].shape[1] == 4 and (t["boxes"] >= 0).all() and (t["boxes"] <= 1).all()
    assert t["labels"].dtype == torch.int64 and set(t["labels"].tolist()) <= {1, 2, 3}
    assert tuple(t["size"].tolist()) == tuple(x.shape[1:])
    # the same item with the same seed gives the same augmentation
    ds_aug = CocoDetection(os.path.join(root, "train"), ann, detr_train_transforms(scale=0.25))
    a1, b1 = ds_aug[(3, 77)]
    a2, b2 = ds_aug[(3, 77)]
    assert torch.equal(a1, a2) and torch.equal(b1["boxes"], b2["boxes"])


def _write_coco(tmp_path, images, annotations, categories=None, write_images=True):
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    if write_images:
        for im in images:
            Image.new("RGB", (im.get("width", 40), im.get("height", 30)), (90, 90, 90)).save(folder / im["file_name"])
    data = {"images": images, "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(folder), str(path)


def _img(i):
    return {"id": i, "file_name": f"{i}.png", "width": 40, "height": 30}


def test_crowd_dropped_and_empty_images_kept(tmp_path):
    anns = [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0, "area": 100},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 1, "area": 100},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0, "area": 0}]
    folder, ann = _write_coco(tmp_path, [_img(1), _img(2)], anns)
    ds = CocoDetection(folder, ann)
    assert ds.num_classes == 4
    _, t = ds[0]
    assert t["labels"].tolist() == [1]
    _, t2 = ds[1]
    assert t2["boxes"].shape == (0, 4) and t2["labels"].numel() == 0


@pytest.mark.parametrize("case", ["missing_file", "corrupt", "missing_field", "negative_width", "unknown_category"])
def test_bad_data_errors_name_the_culprit(tmp_path, case):
    images = [_img(1), _img(2)]
    anns = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
            {"id": 8, "image_id": 2, "category_id": 3, "bbox": [2, 2, 5, 5]}]
    if case == "missing_field":
        del anns[1]["bbox"]
    if case == "negative_width":
        anns[1]["bbox"] = [2, 2, -5, 5]
    if case == "unknown_category":
        anns[1]["category_id"] = 2
    folder, ann = _write_coco(tmp_path, images, anns)
    if case == "missing_file":
        os.unlink(os.path.join(folder, "2.png"))
        with pytest.raises(DataError, match=r"2\.png"):
            CocoDetection(folder, ann)
        ds = CocoDetection(folder, ann, check_files=False)
        with pytest.raises(DataError, match=r"2\.png.*image id 2"):
            ds[1]
        return
    if case == "corrupt":
        with open(os.path.join(folder, "2.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\nnot really a png")
        ds = CocoDetection(folder, ann)
        with pytest.raises(DataError, match=r"cannot read image .*2\.png \(image id 2\)"):
            ds[1]
        return
    expect = {"missing_field": r"annotation id 8 .*'bbox'", "negative_width": r"annotation id 8: .*negative width",
              "unknown_category": r"annotation id 8: category id 2 is not in the categories"}[case]
    with pytest.raises(DataError, match=expect) as info:
        CocoDetection(folder, ann)
    assert "ann.json" in str(info.value)
    if case != "missing_field":
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ds = CocoDetection(folder, ann, skip_invalid=True)
        assert any("annotation id 8" in str(x.message) for x in w)
        assert ds[1][1]["labels"].numel() == 0


def test_bad_json_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        CocoDetection(str(tmp_path), str(p))
    p.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="missing top-level field 'images'"):
        CocoDetection(str(tmp_path), str(p))


def _target(boxes):
    b = torch.tensor(boxes, dtype=torch.float32)
    return {"boxes": b, "labels": torch.arange(len(b)), "area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])}


def test_flip_resize_crop_normalize_boxes():
    img = Image.new("RGB", (100, 50))
    im, t = T.hflip(img, _target([[10, 5, 30, 25]]))
    assert t["boxes"].tolist() == [[70, 5, 90, 25]]
    im, t = T.resize(img, _target([[10, 5, 30, 25]]), 100)
    assert im.size == (200, 100) and t["boxes"].tolist() == [[20, 10, 60, 50]]
    im, t = T.resize(img, _target([[10, 5, 30, 25]]), 100, max_size=150)  # long side capped
    assert im.size == (150, 75)
    im, t = T.crop(img, _target([[10, 5, 30, 25], [80, 40, 95, 48]]), (0, 0, 30, 50))
    assert t["labels"].tolist() == [0] and t["boxes"].tolist() == [[10, 5, 30, 25]]
    x, t = T.Normalize()(Image.new("RGB", (100, 50)), _target([[10, 5, 30, 25]]))
    assert x.shape == (3, 50, 100)
    assert torch.allclose(t["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]]))


def test_train_recipe_structure_and_ranges():
    t = detr_train_transforms()  # the original recipe
    r = repr(t)
    assert "RandomHorizontalFlip(0.5)" in r and "RandomSizeCrop(384, 600)" in r and "max_size=1333" in r
    assert "480, 512" in r and "800]" in r and "[400, 500, 600]" in r
    t = detr_train_transforms(scale=0.25)
    rng = random.Random(0)
    for _ in range(20):
        x, tg = t(Image.new("RGB", (300, 200)), _target([[10, 10, 100, 100]]), rng)
        assert min(x.shape[1:]) <= 200 and max(x.shape[1:]) <= round(1333 * 0.25)
        assert ((tg["boxes"] >= 0) & (tg["boxes"] <= 1)).all()


def test_collate_pads_and_masks():
    a, b = torch.ones(3, 4, 6), torch.ones(3, 5, 3)
    imgs, mask, tg = collate_fn([(a, {"x": 1}), (b, {"x": 2})])
    assert imgs.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert not mask[0, :4, :6].any() and mask[0, 4:].all()
    assert not mask[1, :5, :3].any() and mask[1, :, 3:].all()
    assert imgs[1, :, :, 3:].abs().sum() == 0 and [t["x"] for t in tg] == [1, 2]


def test_sampler_shards_global_batches_and_resumes():
    single = EpochSampler(10, 4, shuffle=True, seed=1)
    single.set_epoch(2)
    ranks = [EpochSampler(10, 2, shuffle=True, seed=1, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    one = list(single)
    per = [list(s) for s in ranks]
    # global batch k of the single process = the union of the ranks' batch k (same augmentation seeds)
    for k in range(2):
        assert sorted(one[4 * k: 4 * k + 4]) == sorted(per[0][2 * k: 2 * k + 2] + per[1][2 * k: 2 * k + 2])
    assert len(per[0]) == len(per[1]) == 6  # 10 padded to 12
    resumed = EpochSampler(10, 4, shuffle=True, seed=1)
    resumed.set_epoch(2, start_batch=1)
    assert list(resumed) == one[4:] and len(resumed) == 6
    other = EpochSampler(10, 4, shuffle=True, seed=1)
    other.set_epoch(3)
    assert [i for i, _ in other] != [i for i, _ in one]


def test_planned_size_matches_the_transformed_image(shapes):
    """CocoDetection.planned_size (the transforms' ``plan``, no pixels) gives the size of the image
    the dataset returns, for the full train recipe (flip, resize, the resize-crop-resize branch)."""
    root, ann = shapes
    ds = CocoDetection(os.path.join(root, "train"), ann, detr_train_transforms(scale=0.25, crop_prob=0.5))
    rng = random.Random(0)
    for _ in range(40):
        item = (rng.randrange(len(ds)), rng.randrange(10**9))
        assert ds.planned_size(*item) == tuple(ds[item][0].shape[1:])
    val = CocoDetection(os.path.join(root, "train"), ann, detr_val_transforms(scale=0.25))
    assert val.planned_size(3, 0) == tuple(val[(3, 0)][0].shape[1:])


def _shape_sampler(sizes, bs, group, **kw):
    return EpochSampler(len(sizes), bs, shuffle=True, seed=4, group_batches=group,
                        size_fn=(lambda i, s: sizes[i]) if group else None, **kw)


def _computed_pixels(items, sizes, bs):
    total = 0
    for k in range(0, len(items), bs):
        b = [sizes[i] for i, _ in items[k: k + bs]]
        total += len(b) * max(h for h, _ in b) * max(w for _, w in b)
    return total


def test_size_grouped_batches_same_items_less_padding_exact_resume_and_ddp_split():
    g = random.Random(7)
    sizes = [(g.randint(60, 200), g.randint(60, 200)) for _ in range(90)]
    plain, grouped = _shape_sampler(sizes, 4, 0), _shape_sampler(sizes, 4, 100)
    for s in (plain, grouped):
        s.set_epoch(5)
    a, b = list(plain), list(grouped)
    # the same (index, augmentation seed) pairs, in batches of similar shapes
    assert sorted(a) == sorted(b) and a != b and len(b) == 90 and grouped.num_batches() == plain.num_batches() == 23
    assert _computed_pixels(b, sizes, 4) < 0.8 * _computed_pixels(a, sizes, 4)
    assert len(b[88:]) == 2 and sorted(b[88:]) == sorted(b[-2:])  # the partial batch stays last
    # deterministic per (seed, epoch), different across epochs; exact mid-epoch resume
    again = _shape_sampler(sizes, 4, 100)
    again.set_epoch(5, start_batch=3)
    assert list(again) == b[12:]
    other = _shape_sampler(sizes, 4, 100)
    other.set_epoch(6)
    assert list(other) != b
    # pools: sorting happens within pools of `group_batches` global batches
    pooled = _shape_sampler(sizes, 4, 2)
    pooled.set_epoch(5)
    pb = list(pooled)
    assert sorted(pb[:8]) == sorted(a[:8])
    # DDP: the ranks split each grouped global batch as a single process with the global batch sees it
    # (88 images: no DDP padding, which would add items to the pools)
    sizes = sizes[:88]
    ranks = [_shape_sampler(sizes, 2, 100, num_replicas=2, rank=r) for r in range(2)]
    single = _shape_sampler(sizes, 4, 100)
    for s in ranks + [single]:
        s.set_epoch(1)
    one, per = list(single), [list(s) for s in ranks]
    for k in range(22):
        assert sorted(one[4 * k: 4 * k + 4]) == sorted(per[0][2 * k: 2 * k + 2] + per[1][2 * k: 2 * k + 2])
    with pytest.raises(ValueError, match="size_fn"):
        EpochSampler(10, 2, group_batches=3)
    with pytest.raises(ValueError, match="group_batches"):
        EpochSampler(10, 2, group_batches=-1, size_fn=lambda i, s: (1, 1))


def test_build_loader_grouping_needs_planned_sizes():
    from dabdetr.data import build_loader

    class NoPlan(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 2, 2), {}

    with pytest.raises(ValueError, match="planned_size"):
        build_loader(NoPlan(), 2, shuffle=True, group_batches=10)
