"""Query denoising (DN-DETR) as an optional DAB-DETR training aid: query construction, the
self-attention mask, independence of the matching queries, and the denoising loss."""

import pytest
import torch

from dabdetr.models import DABDETR, get_preset
from dabdetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou_pairwise
from dabdetr.models.criterion import sigmoid_focal_loss
from dabdetr.models.denoising import make_denoising_queries


def _targets(gen):
    def one(n):
        cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        return {"labels": torch.randint(1, 4, (n,), generator=gen), "boxes": torch.cat([cxcy, wh], 1)}

    return [one(3), one(1), one(0)]


def _model(**over):
    cfg = get_preset("tiny").model.replace(num_classes=4, backbone_width=8, hidden_dim=32, nheads=4,
                                           dim_feedforward=64, num_queries=7, **{"dn_groups": 3, **over})
    return DABDETR(cfg)


def test_queries_mask_and_noise_bounds():
    gen = torch.Generator().manual_seed(0)
    targets = _targets(gen)
    emb = torch.nn.Embedding(4, 16)
    Q, G, lam = 7, 3, 0.4
    dn = make_denoising_queries(targets, Q, emb, G, label_noise=0.0, box_noise=lam, generator=gen)
    P = 3
    assert dn.pad == P and dn.num_queries == G * P
    assert dn.content.shape == (3, G * P, 16) and dn.anchors.shape == (3, G * P, 4)
    assert dn.valid.tolist() == [[True] * 3 * G, [True, False, False] * G, [False] * 3 * G]
    # no label noise: the content is the true class's embedding
    for i, t in enumerate(targets):
        for g in range(G):
            for k in range(len(t["labels"])):
                torch.testing.assert_close(dn.content[i, g * P + k], emb.weight[t["labels"][k]])
                assert dn.target_index[i, g * P + k] == k
                # box noise bounds: centre within λ·side/2, sides within (1 ± λ)
                box = dn.anchors[i, g * P + k].sigmoid()
                src = t["boxes"][k]
                assert ((box[:2] - src[:2]).abs() <= lam * src[2:] / 2 + 1e-3).all()
                ratio = box[2:] / src[2:]
                assert ((ratio >= 1 - lam - 1e-3) & (ratio <= 1 + lam + 1e-3)).all()
    m = dn.self_attn_mask[:, 0]
    N = G * P + Q
    assert m.shape == (3, N, N)
    for i in range(3):
        for r in range(N):
            for c in range(N):
                r_dn, c_dn = r < G * P, c < G * P
                if c_dn and not bool(dn.valid[i, c]):
                    expect = False  # padding is seen by nobody
                elif not r_dn:
                    expect = not c_dn  # matching queries see only matching queries
                elif c_dn:
                    expect = r // P == c // P  # own group only
                else:
                    expect = True  # denoising queries see the matching queries
                assert bool(m[i, r, c]) == expect, (i, r, c)
    assert m.any(-1).all()  # no row is fully masked


def test_label_noise_rate():
    gen = torch.Generator().manual_seed(1)
    targets = [{"labels": torch.full((50,), 2), "boxes": torch.full((50, 4), 0.5)} for _ in range(4)]
    emb = torch.nn.Embedding(10, 4)
    dn = make_denoising_queries(targets, 5, emb, 20, label_noise=0.5, box_noise=0.0, generator=gen)
    changed = (dn.content - emb.weight[2]).abs().sum(-1) > 0
    # a flipped label is uniform over 10 classes, so 0.5 * 0.9 of them differ
    assert abs(changed.float().mean().item() - 0.45) < 0.03
    torch.testing.assert_close(dn.anchors.sigmoid(), torch.full_like(dn.anchors, 0.5), atol=1e-6, rtol=0)


def test_matching_queries_do_not_see_denoising_queries():
    torch.manual_seed(0)
    model = _model().train()
    targets = _targets(torch.Generator().manual_seed(2))
    images = torch.randn(3, 3, 64, 96)
    mask = torch.zeros(3, 64, 96, dtype=torch.bool)
    mask[1, :, 70:] = True
    with_dn = model(images, mask, targets=targets)
    without = model(images, mask)
    assert "dn" in with_dn and "dn" not in without
    torch.testing.assert_close(with_dn["pred_logits"], without["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn["pred_boxes"], without["pred_boxes"], atol=1e-5, rtol=1e-5)
    assert len(with_dn["dn"]["layers"]) == model.config.dec_layers
    # eval mode: no denoising queries even with targets
    model.eval()
    assert "dn" not in model(images, mask, targets=targets)


def test_denoising_loss_matches_direct_formula():
    torch.manual_seed(0)
    model = _model().train()
    crit = model.build_criterion()
    targets = _targets(torch.Generator().manual_seed(3))
    images = torch.randn(3, 3, 64, 96)
    out = model(images, None, targets=targets)
    losses = crit(out, targets)
    dn = out["dn"]
    nb = sum(len(t["labels"]) for t in targets) * dn["groups"]
    last = dn["layers"][-1]
    b, q = dn["valid"].nonzero(as_tuple=True)
    j = dn["target_index"][b, q]
    labels = torch.stack([targets[bi]["labels"][ji] for bi, ji in zip(b.tolist(), j.tolist())])
    boxes = torch.stack([targets[bi]["boxes"][ji] for bi, ji in zip(b.tolist(), j.tolist())])
    onehot = torch.zeros_like(last["pred_logits"])
    onehot[b, q, labels] = 1
    # padding queries are not in the loss at all: only valid rows count
    keep = dn["valid"]
    ce = sigmoid_focal_loss(last["pred_logits"][keep], onehot[keep], nb)
    src = last["pred_boxes"][b, q]
    l1 = (src - boxes).abs().sum() / nb
    giou = (1 - generalized_box_iou_pairwise(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(boxes))).sum() / nb
    torch.testing.assert_close(losses["loss_bbox_dn"], l1)
    torch.testing.assert_close(losses["loss_giou_dn"], giou)
    assert "loss_ce_dn_0" in losses and crit.weight_dict["loss_ce_dn_0"] == crit.weight_dict["loss_ce"]
    torch.testing.assert_close(losses["loss_ce_dn"], ce)
    crit.total(losses).backward()
    assert model.label_enc.weight.grad is not None and model.label_enc.weight.grad.abs().sum() > 0


def test_batch_without_boxes_keeps_label_embedding_in_graph():
    model = _model().train()
    crit = model.build_criterion()
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = model(torch.randn(2, 3, 64, 64), None, targets=targets)
    assert "dn" not in out
    crit.total(crit(out, targets)).backward()
    assert model.label_enc.weight.grad is not None


def test_disabled_by_default_and_bad_value():
    assert get_preset("r50").model.dn_groups == 0
    assert _model(dn_groups=0).label_enc is None
    with pytest.raises(ValueError, match="dn_groups"):
        _model(dn_groups=-1)


# ---------------------------------------------------------------- dense auxiliary loss on the encoder
def test_center_heatmap_targets():
    from dabdetr.models.dense_aux import center_heatmap_targets

    mask = torch.zeros(2, 10, 16, dtype=torch.bool)
    mask[1, :, 8:] = True  # image 1 covers 8 of the 16 columns
    targets = [{"labels": torch.tensor([2, 2]), "boxes": torch.tensor([[0.25, 0.5, 0.2, 0.4], [0.8, 0.2, 0.1, 0.1]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    heat, centres = center_heatmap_targets(targets, mask, 3)
    assert heat.shape == (2, 3, 10, 16)
    assert heat[0, 2, 5, 4] == 1 and heat[0, 2, 2, 12] == 1  # the cells holding the centres
    assert heat[0, 2].eq(1).sum() == 2 and heat[0, :2].abs().sum() == 0
    assert heat[1, 1, 5, 4] == 1  # centre in the valid 8-column region, not the padded 16
    assert heat[1, :, :, 8:].abs().sum() == 0  # padding cells get no target
    assert centres[0][0].tolist() == [5, 2] and centres[0][1].tolist() == [4, 12]
    # Gaussian falls off away from the centre
    assert 0 < heat[0, 2, 5, 6] < heat[0, 2, 5, 5] < 1


def test_dense_aux_loss_trains_the_encoder_and_is_off_at_inference():
    torch.manual_seed(0)
    model = _model(dn_groups=0, enc_aux_coef=1.0).train()
    crit = model.build_criterion()
    targets = _targets(torch.Generator().manual_seed(4))
    images = torch.randn(3, 3, 64, 96)
    out = model(images, None, targets=targets)
    losses = crit(out, targets)
    assert {"loss_enc_heatmap", "loss_enc_bbox"} <= set(crit.weight_dict) and losses["loss_enc_heatmap"] > 0
    crit.total(losses).backward()
    enc_grad = sum(p.grad.abs().sum() for p in model.transformer.encoder.parameters() if p.grad is not None)
    assert model.enc_aux_head.conv.weight.grad.abs().sum() > 0 and enc_grad > 0
    model.eval()
    with torch.no_grad():
        assert "enc_aux" not in model(images, None)


def test_select_anchors_peaks_centres_sizes_and_padding():
    from dabdetr.models.dense_aux import select_anchors

    B, K, h, w = 2, 3, 4, 6
    logits = torch.full((B, K, h, w), -6.0)
    logits[0, 1, 1, 2] = 3.0  # a peak...
    logits[0, 1, 1, 3] = 2.5  # ...its neighbour: not a local maximum, ranked after every peak
    logits[0, 2, 3, 5] = 1.0  # a weaker, separate peak
    logits[1, 0, 0, 5] = 4.0  # image 1: best cell in its padding (columns >= 4)
    logits[1, 0, 2, 1] = 2.0
    boxes = torch.rand(B, 4, h, w, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(B, h, w, dtype=torch.bool)
    mask[1, :, 4:] = True
    a = select_anchors(logits, boxes, mask, k=3).sigmoid()
    assert a.shape == (B, 3, 4)
    # image 0: the two peaks first (centre of the cell, size from the box head)
    torch.testing.assert_close(a[0, 0], torch.tensor([2.5 / 6, 1.5 / 4, boxes[0, 2, 1, 2], boxes[0, 3, 1, 2]]))
    torch.testing.assert_close(a[0, 1], torch.tensor([5.5 / 6, 3.5 / 4, boxes[0, 2, 3, 5], boxes[0, 3, 3, 5]]))
    # the neighbour of the first peak is not a local maximum: flat background cells (local maxima of
    # a flat region) come before it
    assert not torch.isclose(a[0, 2, :2], torch.tensor([3.5 / 6, 1.5 / 4])).all()
    # image 1: never a padding cell; centres normalised by the valid width (4 cells)
    torch.testing.assert_close(a[1, 0, :2], torch.tensor([1.5 / 4, 2.5 / 4]))
    assert (a[1, :, 0] < 1).all()
    # fewer cells than queries: the best cells repeat
    small = select_anchors(logits[:, :, :1, :2], boxes[:, :, :1, :2], mask[:, :1, :2], k=5)
    assert small.shape == (B, 5, 4) and torch.equal(small[:, 2:4], small[:, :2])


def test_query_selection_model_trains_and_predicts():
    with pytest.raises(ValueError, match="enc_aux_coef"):
        _model(query_selection=True)
    torch.manual_seed(0)
    model = _model(enc_aux_coef=1.0, query_selection=True).train()
    assert model.refpoint_embed is None
    crit = model.build_criterion()
    targets = _targets(torch.Generator().manual_seed(4))
    images = torch.randn(3, 3, 64, 96)
    out = model(images, None, targets=targets)
    assert out["pred_boxes"].shape == (3, 7, 4) and "enc_aux" in out and "dn" in out
    crit.total(crit(out, targets)).backward()
    assert model.enc_aux_head.cls.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), \
        [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.eval()
    with torch.no_grad():
        o1 = model(images, None)
        o2 = model(images[:1], None)
    assert "enc_aux" not in o1
    torch.testing.assert_close(o1["pred_boxes"][:1], o2["pred_boxes"], atol=1e-5, rtol=1e-4)
