"""Each loss against values computed by hand on tiny tensors."""

import math

import pytest
import torch

from imem.errors import ImemError
from imem.losses import (
    LOG_EPS,
    LossCombiner,
    LossSettings,
    NonFiniteLoss,
    cdcml_losses,
    cfm_loss,
    cfr_loss,
    log_ratio_loss,
    mse,
    pairwise_distance,
    sfr_loss,
    sigma_of,
    va_mse,
)


def L(x):
    return math.log(x + LOG_EPS)


def test_pairwise_distance_squared_and_plain():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert pairwise_distance(a, b).tolist() == [[25.0, 1.0]]
    assert pairwise_distance(a, b, squared=False)[0, 0].item() == pytest.approx(math.sqrt(25 + 1e-4 / 2))


def test_pairwise_distance_matches_elementwise_and_identical_rows_stay_near_zero():
    # the float64 expansion against the element-wise definition, at the embeddings' scale (norms ~ 20)
    torch.manual_seed(0)
    a, b = torch.randn(64, 512), torch.randn(48, 512)
    b[7] = a[3]  # the same item in two pairs of a batch
    want = ((a.double()[:, None, :] - b.double()[None]) ** 2).sum(-1)
    got = pairwise_distance(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert 0.0 <= float(got[3, 7]) < LOG_EPS * 1e-3  # 0 on both sides of a log-ratio
    # and its gradient is the element-wise one's: 2 (a_i - b_j) summed over j
    a.requires_grad_(True)
    pairwise_distance(a, b).sum().backward()
    torch.testing.assert_close(a.grad.double(), 2 * (a.detach().double()[:, None] - b.double()[None]).sum(1),
                               rtol=1e-5, atol=1e-3)


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
    # CDCML eqs. 4-5 are sums over the anchors (the thesis' eq. 3.3 form: the mean above)
    assert sfr_loss(f, y, reduction="sum").item() == pytest.approx(a0 + a1 + a2, rel=1e-5)


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


def test_cross_modal_dense_log_ratio_by_hand():
    # cfr: dense (imem's earlier form). Image anchor 0 at 0; music neighbours at 1 and 2 (squared: 1, 4);
    # labels 0 vs 1, 3 (1, 9)
    fi, yi = torch.tensor([[0.0]]), torch.tensor([[0.0]])
    fm, ym = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [3.0]])
    img_anchor = ((L(1) - L(4)) - (L(1) - L(9))) ** 2
    # music anchors have one neighbour (the single image): no pair j < k, they contribute nothing
    assert log_ratio_loss(fm, fi, ym, yi).item() == 0.0
    assert log_ratio_loss(fi, fm, yi, ym).item() == pytest.approx(img_anchor, rel=1e-5)
    # the two halves are added (eq. 2 is a sum of the image-anchor and the music-anchor terms)
    assert cfr_loss(fi, fm, yi, ym, LossSettings(cfr="dense", reduction="mean")).item() == pytest.approx(img_anchor, rel=1e-5)


# Three pairs (I_i, M_i) in 1-D: embeddings and VA labels. Eq. 2 per anchor I_i: its partner M_i and each other M_j.
FI, FM = torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([[1.0], [2.5], [3.0]])
YI, YM = torch.tensor([[0.1], [0.5], [0.9]]), torch.tensor([[0.2], [0.4], [0.6]])


def _eq2_by_hand(target) -> tuple[float, float]:
    """Sum and mean form of eq. 2 on FI/FM, ``target(anchor_y, partner_y, other_y)`` the label log-ratio."""
    fi, fm, yi, ym = ([float(v) for v in t[:, 0]] for t in (FI, FM, YI, YM))
    halves = []
    for fa, fb, ya, yb in ((fi, fm, yi, ym), (fm, fi, ym, yi)):
        per_anchor = []
        for i in range(3):
            terms = [((L((fa[i] - fb[i]) ** 2) - L((fa[i] - fb[j]) ** 2)) - target(ya[i], yb[i], yb[j])) ** 2
                     for j in range(3) if j != i]
            per_anchor.append(sum(terms) / len(terms))  # the expectation over the random neighbour M_j
        halves.append(per_anchor)
    return sum(halves[0]) + sum(halves[1]), sum(halves[0]) / 3 + sum(halves[1]) / 3


def test_cfr_pair_is_eq2_with_the_label_distance_ratio_by_hand():
    total, mean = _eq2_by_hand(lambda a, p, o: L((a - p) ** 2) - L((a - o) ** 2))
    assert cfr_loss(FI, FM, YI, YM, LossSettings(cfr="pair", reduction="sum")).item() == pytest.approx(total, rel=1e-5)
    assert cfr_loss(FI, FM, YI, YM, LossSettings(cfr="pair", reduction="mean")).item() == pytest.approx(mean, rel=1e-5)


def test_cfr_literal_is_eq2_as_printed_by_hand():
    sigma = 0.3
    score = torch.exp(-(YI - YM).abs()[:, 0] / sigma)  # eq. 1 on the batch's own pairs
    assert sigma_of(score.double(), (YI - YM).abs()[:, 0].double()).item() == pytest.approx(sigma, rel=1e-6)
    logs = lambda a, b: -abs(a - b) / sigma  # noqa: E731 -- log S(a, b), eq. 1
    total, _ = _eq2_by_hand(lambda a, p, o: logs(a, p) - logs(a, o))
    got = cfr_loss(FI, FM, YI, YM, LossSettings(cfr="literal", reduction="sum"), score=score).item()
    assert got == pytest.approx(total, rel=1e-5)
    with pytest.raises(ImemError, match="literal needs"):
        cfr_loss(FI, FM, YI, YM, LossSettings(cfr="literal"))


def test_cfr_literal_pushes_the_closer_partner_away_and_pair_pulls_it_in():
    # anchor image at 0; its partner M_0 has the SAME VA (S = 1), M_1 is far in VA; both at embedding distance 1
    fi = torch.tensor([[0.0], [10.0]], requires_grad=True)
    fm = torch.tensor([[1.0], [-1.0]])
    yi, ym = torch.tensor([[0.5], [0.0]]), torch.tensor([[0.5], [1.0]])
    score = torch.exp(-(yi - ym).abs()[:, 0] / 0.4)
    for form, sign in (("literal", +1), ("pair", -1)):
        fi.grad = None
        cfr_loss(fi, fm, yi, ym, LossSettings(cfr=form), score=score).backward()
        # d loss / d fi[0] < 0 moves fi[0] up (towards M_0 at 1) under gradient descent; > 0 moves it away
        step = -float(fi.grad[0, 0])
        assert (step < 0) if sign > 0 else (step > 0), (form, step)


def test_cfm_hinge_is_eq3_by_hand():
    fi, fm = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.6, 0.8]])
    s = torch.tensor([0.25, 1.0])
    # distances 5 and 1; alpha 2: [5 - 2]+ + [1 - 2]+ = 3, whatever S
    assert cfm_loss(fi, fm, s, margin=2.0, reduction="sum").item() == pytest.approx(3.0, rel=1e-6)
    assert cfm_loss(fi, fm, torch.zeros(2), margin=2.0, reduction="mean").item() == pytest.approx(1.5, rel=1e-6)
    assert cfm_loss(fi, fm, s, margin=6.0).item() == 0.0


def test_cfm_contrastive_option_by_hand():
    fi, fm = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.6, 0.8]])
    s = torch.tensor([0.25, 1.0])
    # pair 0: d = 5, alpha 6 -> 0.25 * 25 + 0.75 * 1; pair 1: d = 1, S = 1 -> 1
    expect = (0.25 * 25 + 0.75 * 1.0 + 1.0) / 2
    assert cfm_loss(fi, fm, s, margin=6.0, form="contrastive").item() == pytest.approx(expect, rel=1e-4)
    # beyond the margin a dissimilar pair costs nothing
    assert cfm_loss(fi[:1], fm[:1], torch.tensor([0.0]), margin=2.0, form="contrastive").item() == 0.0


def test_unknown_loss_forms_are_refused_in_one_line():
    with pytest.raises(ImemError, match=r"train cfr = 'x' is not one of: pair, literal, dense"):
        LossSettings(cfr="x")
    with pytest.raises(ImemError, match=r"train reduction = 'avg' is not one of: sum, mean"):
        LossSettings(reduction="avg")


def test_va_loss_sums_valence_and_arousal_per_item():
    # eq. 7: (1/n) sum_j ||y_j - y^_j||^2; item 0 errs by (0.3, 0.4) -> 0.25, item 1 by (0, 0.1) -> 0.01
    pred, true = torch.tensor([[0.3, 0.4], [0.5, 0.6]]), torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    assert va_mse(pred, true).item() == pytest.approx((0.25 + 0.01) / 2, rel=1e-6)


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
    for settings in (LossSettings(margin=1.0), LossSettings(margin=1.0, squared=False, reduction="mean"),
                     LossSettings(margin=1.0, cfr="literal", cfm="contrastive"), LossSettings(margin=1.0, cfr="dense")):
        losses = cdcml_losses(out, batch, settings)
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


def test_first_batch_mode_is_the_weighted_mean_of_the_normalised_losses():
    """Thesis eq. 3.10 with unequal weights: sum_i w_i L_i / L_i^(1) divided by the weight *sum* (3 + 1), not by
    the number of losses (2), which equal weights cannot tell apart."""
    fb = LossCombiner("first_batch", {"a": 3.0, "b": 1.0})
    assert fb({"a": torch.tensor(2.0), "b": torch.tensor(4.0)}).item() == pytest.approx((3 * 1 + 1 * 1) / 4)
    assert fb({"a": torch.tensor(1.0), "b": torch.tensor(8.0)}).item() == pytest.approx((3 * 0.5 + 1 * 2.0) / 4)
    # a weight of 0 leaves the loss out of the numerator and the denominator alike
    drop = LossCombiner("first_batch", {"a": 2.0, "b": 0.0})
    assert drop({"a": torch.tensor(5.0), "b": torch.tensor(1.0)}).item() == pytest.approx(1.0)
    assert drop({"a": torch.tensor(2.5), "b": torch.tensor(9.0)}).item() == pytest.approx(0.5)


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
