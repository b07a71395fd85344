"""Hungarian matcher: optimality against brute force, the cost formula against an independent
float64 computation, batched == per image, empty targets, more targets than queries, degenerate and
non-finite predictions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dabdetr.models import HungarianMatcher
from dabdetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou, generalized_box_iou_pairwise
from dabdetr.models.matcher import matching_cost


def _random_problem(gen, B, Q, K, sizes):
    logits = torch.randn(B, Q, K, generator=gen) * 2
    boxes = torch.cat([0.2 + 0.6 * torch.rand(B, Q, 2, generator=gen), 0.05 + 0.4 * torch.rand(B, Q, 2, generator=gen)], -1)
    targets = []
    for n in sizes:
        targets.append({"labels": torch.randint(0, K, (n,), generator=gen),
                        "boxes": torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=gen),
                                            0.05 + 0.4 * torch.rand(n, 2, generator=gen)], -1)})
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def _cost64(logits, boxes, labels, tboxes, wc=2.0, wb=5.0, wg=2.0, alpha=0.25):
    """The cost of REFERENCE.md §6 written out per pair in float64."""
    Q, M = logits.shape[0], labels.shape[0]
    C = torch.zeros(Q, M, dtype=torch.float64)
    for q in range(Q):
        for j in range(M):
            p = torch.sigmoid(logits[q, labels[j]].double()).item()
            neg = (1 - alpha) * p ** 2 * -math.log(1 - p + 1e-8)
            pos = alpha * (1 - p) ** 2 * -math.log(p + 1e-8)
            l1 = (boxes[q].double() - tboxes[j].double()).abs().sum().item()
            a = box_cxcywh_to_xyxy(boxes[q].double())
            b = box_cxcywh_to_xyxy(tboxes[j].double())
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            encl = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
            giou = inter / (union + 1e-6) - (encl - union) / (encl + 1e-6)
            C[q, j] = wb * l1 + wc * (pos - neg) + wg * -float(giou)
    return C


def _brute_force_min(C):
    Q, M = C.shape
    best = math.inf
    if M <= Q:
        for perm in itertools.permutations(range(Q), M):
            best = min(best, sum(C[perm[j], j].item() for j in range(M)))
    else:
        for perm in itertools.permutations(range(M), Q):
            best = min(best, sum(C[q, perm[q]].item() for q in range(Q)))
    return best


def test_cost_matches_float64_formula(gen):
    outputs, targets = _random_problem(gen, 1, 7, 5, [4])
    C = matching_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"])
    ref = _cost64(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"])
    assert C.dtype == torch.float32
    torch.testing.assert_close(C.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Q,n", [(5, 3), (6, 6), (4, 1), (3, 5)])
def test_assignment_is_optimal(gen, Q, n):
    matcher = HungarianMatcher()
    for _ in range(5):
        outputs, targets = _random_problem(gen, 1, Q, 4, [n])
        (qi, ti), = matcher(outputs, targets)
        assert len(qi) == len(ti) == min(Q, n)
        assert len(set(qi.tolist())) == len(qi) and len(set(ti.tolist())) == len(ti)
        assert torch.all(qi[1:] > qi[:-1]), "query indices must be ascending"
        C = _cost64(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"])
        got = C[qi, ti].sum().item()
        assert got <= _brute_force_min(C) + 1e-4


def test_batched_equals_per_image(gen):
    matcher = HungarianMatcher()
    outputs, targets = _random_problem(gen, 4, 30, 9, [3, 0, 7, 1])
    batched = matcher(outputs, targets)
    for b in range(4):
        single = matcher({k: v[b:b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
    assert batched[1][0].numel() == 0 and batched[1][0].dtype == torch.int64


def test_empty_targets(gen):
    matcher = HungarianMatcher()
    outputs, targets = _random_problem(gen, 2, 10, 5, [0, 0])
    res = matcher(outputs, targets)
    assert len(res) == 2
    for q, t in res:
        assert q.shape == (0,) and t.shape == (0,) and q.dtype == t.dtype == torch.int64


def test_degenerate_and_nonfinite_predictions_do_not_crash(gen):
    matcher = HungarianMatcher()
    outputs, targets = _random_problem(gen, 2, 8, 5, [3, 2])
    boxes = outputs["pred_boxes"].clone()
    boxes[0, 0, 2:] = 0.0  # zero-size box
    boxes[0, 1] = torch.tensor([0.5, 0.5, 0.0, 0.3])  # zero width
    boxes[0, 2] = torch.tensor([0.5, 0.5, -0.1, 0.2])  # inverted
    boxes[1, 0] = float("nan")
    boxes[1, 1, 0] = float("inf")
    logits = outputs["pred_logits"].clone()
    logits[1, 2] = float("nan")
    res = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for (q, t), tgt in zip(res, targets):
        assert len(q) == len(tgt["labels"]) and len(set(q.tolist())) == len(q)
    # a NaN prediction is never preferred over finite ones when enough finite queries exist
    assert not {0, 1, 2} & set(res[1][0].tolist())


def test_matcher_float32_under_autocast(gen):
    matcher = HungarianMatcher()
    outputs, targets = _random_problem(gen, 2, 16, 6, [3, 2])
    ref = matcher(outputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher({k: v.to(torch.bfloat16).float() for k, v in outputs.items()}, targets)
        got2 = matcher(outputs, targets)
    for (a, b), (c, d) in zip(ref, got2):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert len(got) == 2


def test_pairwise_giou_is_the_diagonal(gen):
    a = box_cxcywh_to_xyxy(torch.cat([torch.rand(9, 2, generator=gen), 0.1 + torch.rand(9, 2, generator=gen)], -1))
    b = box_cxcywh_to_xyxy(torch.cat([torch.rand(9, 2, generator=gen), 0.1 + torch.rand(9, 2, generator=gen)], -1))
    torch.testing.assert_close(generalized_box_iou_pairwise(a, b), generalized_box_iou(a, b).diagonal())
    same = generalized_box_iou_pairwise(a, a)
    torch.testing.assert_close(same, torch.ones(9), atol=1e-4, rtol=0)  # the +1e-6 in the denominators
