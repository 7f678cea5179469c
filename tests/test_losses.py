"""Each loss against values computed by hand on tiny tensors."""

import math

import pytest
import torch

from imem.losses import (
    LOG_EPS,
    LossCombiner,
    NonFiniteLoss,
    cdcml_losses,
    cfm_loss,
    cfr_loss,
    log_ratio_loss,
    mse,
    pairwise_distance,
    sfr_loss,
)


def L(x):
    return math.log(x + LOG_EPS)


def test_pairwise_distance_squared_and_plain():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert pairwise_distance(a, b).tolist() == [[25.0, 1.0]]
    assert pairwise_distance(a, b, squared=False)[0, 0].item() == pytest.approx(math.sqrt(25 + 1e-4 / 2))


def test_single_modal_log_ratio_by_hand():
    # 1-D embeddings f = 0, 1, 3 and labels y = 0, 2, 4; squared distances.
    f = torch.tensor([[0.0], [1.0], [3.0]])
    y = torch.tensor([[0.0], [2.0], [4.0]])
    a0 = ((L(1) - L(9)) - (L(4) - L(16))) ** 2   # anchor 0, neighbours 1, 2
    a1 = ((L(1) - L(4)) - (L(4) - L(4))) ** 2    # anchor 1, neighbours 0, 2
    a2 = ((L(9) - L(4)) - (L(16) - L(4))) ** 2   # anchor 2, neighbours 0, 1
    expect = (a0 + a1 + a2) / 3
    assert expect == pytest.approx(0.9702, abs=1e-3)
    assert sfr_loss(f, y).item() == pytest.approx(expect, rel=1e-5)
    assert log_ratio_loss(f, f, y, y, same_set=True).item() == pytest.approx(expect, rel=1e-5)


def test_plain_euclidean_option_uses_plain_distances_on_both_sides():
    f = torch.tensor([[0.0], [1.0], [3.0]])
    y = torch.tensor([[0.0], [2.0], [4.0]])
    e = 1e-4  # the embedding side's guard, 1e-4 / dim with dim = 1
    a0 = ((L(math.sqrt(1 + e)) - L(math.sqrt(9 + e))) - (L(math.sqrt(4 + e)) - L(math.sqrt(16 + e)))) ** 2
    a1 = ((L(math.sqrt(1 + e)) - L(math.sqrt(4 + e))) - (L(math.sqrt(4 + e)) - L(math.sqrt(4 + e)))) ** 2
    a2 = ((L(math.sqrt(9 + e)) - L(math.sqrt(4 + e))) - (L(math.sqrt(16 + e)) - L(math.sqrt(4 + e)))) ** 2
    assert sfr_loss(f, y, squared=False).item() == pytest.approx((a0 + a1 + a2) / 3, rel=1e-4)


def test_feature_ratio_is_zero_when_distance_ratios_equal_label_ratios():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(8, 2, generator=g)
    f = 3.0 * torch.cat([y, torch.zeros(8, 5)], dim=1)  # distances scale by 9: every ratio equal
    assert sfr_loss(f, y).item() < 1e-6
    y2 = torch.rand(8, 2, generator=g)
    f2 = 3.0 * torch.cat([y2, torch.zeros(8, 5)], dim=1)  # same space and scale as f: cross ratios equal too
    assert cfr_loss(f, f2, y, y2).item() < 1e-6
    assert sfr_loss(f + 0.3 * torch.rand(8, 7, generator=g), y).item() > 1e-2  # and not zero otherwise


def test_cross_modal_log_ratio_by_hand():
    # image anchor 0 at 0; music neighbours at 1 and 2 (squared: 1, 4); labels 0 vs 1, 3 (1, 9)
    fi, yi = torch.tensor([[0.0]]), torch.tensor([[0.0]])
    fm, ym = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [3.0]])
    img_anchor = ((L(1) - L(4)) - (L(1) - L(9))) ** 2
    # music anchors have one neighbour (the single image): no pair j < k, they contribute nothing
    assert log_ratio_loss(fm, fi, ym, yi).item() == 0.0
    assert log_ratio_loss(fi, fm, yi, ym).item() == pytest.approx(img_anchor, rel=1e-5)
    assert cfr_loss(fi, fm, yi, ym).item() == pytest.approx(0.5 * img_anchor, rel=1e-5)


def test_cfm_by_hand():
    fi, fm = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.6, 0.8]])
    s = torch.tensor([0.25, 1.0])
    # pair 0: d = 5, alpha 6 -> 0.25 * 25 + 0.75 * 1; pair 1: d = 1, S = 1 -> 1
    expect = (0.25 * 25 + 0.75 * 1.0 + 1.0) / 2
    assert cfm_loss(fi, fm, s, margin=6.0).item() == pytest.approx(expect, rel=1e-4)
    # beyond the margin a dissimilar pair costs nothing
    assert cfm_loss(fi[:1], fm[:1], torch.tensor([0.0]), margin=2.0).item() == 0.0


def test_mse_losses():
    assert mse(torch.tensor([0.5, 1.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(0.125)


def test_all_seven_and_finite_gradients():
    g = torch.Generator().manual_seed(1)
    fi = torch.randn(16, 8, generator=g, requires_grad=True)
    fm = torch.randn(16, 8, generator=g, requires_grad=True)
    out = {"f_image": fi, "f_music": fm, "sim": torch.rand(16, generator=g, requires_grad=True),
           "va_image": torch.rand(16, 2, generator=g, requires_grad=True),
           "va_music": torch.rand(16, 2, generator=g, requires_grad=True)}
    batch = {"image_va": torch.rand(16, 2, generator=g), "music_va": torch.rand(16, 2, generator=g),
             "score": torch.rand(16, generator=g)}
    for squared in (True, False):
        losses = cdcml_losses(out, batch, margin=1.0, squared=squared)
        assert set(losses) == {"cfr", "cfm", "sfr_image", "sfr_music", "sim", "va_image", "va_music"}
        total = LossCombiner("sum")(losses)
        total.backward()
        for t in (fi, fm, out["sim"]):
            assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
            t.grad = None
    # identical embeddings (distance 0) keep gradients finite too
    same = torch.zeros(4, 3, requires_grad=True)
    sfr_loss(same, torch.rand(4, 2), squared=False).backward()
    assert torch.isfinite(same.grad).all()


def test_combination_modes():
    c = LossCombiner("sum", {"sim": 2.0, "cfm": 0.0})
    assert c.active(("sim", "cfm", "cfr")) == ("sim", "cfr")
    assert c({"sim": torch.tensor(1.5), "cfr": torch.tensor(0.5)}).item() == pytest.approx(3.5)
    fb = LossCombiner("first_batch")
    assert fb({"a": torch.tensor(2.0), "b": torch.tensor(4.0)}).item() == pytest.approx(1.0)
    assert fb({"a": torch.tensor(1.0), "b": torch.tensor(8.0)}).item() == pytest.approx((0.5 + 2.0) / 2)
    restored = LossCombiner("first_batch")
    restored.load_state_dict(fb.state_dict())
    assert restored({"a": torch.tensor(1.0), "b": torch.tensor(8.0)}).item() == pytest.approx(1.25)


def test_non_finite_loss_stops_with_a_clear_message():
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss: sim = nan"):
        LossCombiner()({"sim": torch.tensor(float("nan")), "cfr": torch.tensor(1.0)})


def test_variance_identity_equals_the_explicit_sum_over_neighbour_pairs():
    """log_ratio_loss uses sum_{j<k}(x_j - x_k)^2 = n sum_j (x_j - mean)^2; check against the O(B^3) sum."""
    g = torch.Generator().manual_seed(3)
    fa, fn = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g)
    ya, yn = torch.rand(7, 2, generator=g), torch.rand(9, 2, generator=g)
    for same_set, (f2, y2) in ((False, (fn, yn)), (True, (fa, ya))):
        le = torch.log(pairwise_distance(fa, f2) + LOG_EPS).double()
        ll = torch.log(pairwise_distance(ya, y2) + LOG_EPS).double()
        per_anchor = []
        for a in range(le.shape[0]):
            nbrs = [j for j in range(le.shape[1]) if not (same_set and j == a)]
            terms = [((le[a, j] - le[a, k]) - (ll[a, j] - ll[a, k])) ** 2 for i, j in enumerate(nbrs) for k in nbrs[i + 1:]]
            per_anchor.append(sum(terms) / len(terms))
        expect = float(sum(per_anchor) / len(per_anchor))
        got = log_ratio_loss(fa, f2, ya, y2, same_set=same_set).item()
        assert got == pytest.approx(expect, rel=1e-4)
