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


# Mutation testing (issue 21, docs/testing.md): the boundaries and the wiring the tests above do not reach.

def test_loss_settings_from_a_train_config():
    """params.yaml's train keys: margin, cfr, cfm, reduction and distance (squared unless 'euclidean'); the
    forms default to the paper's (pair, hinge, sum, squared) when a config leaves them out."""
    s = LossSettings.from_config({"margin": 2, "cfr": "literal", "cfm": "contrastive", "reduction": "mean",
                                  "distance": "euclidean"})
    assert s == LossSettings(margin=2.0, cfr="literal", cfm="contrastive", reduction="mean", squared=False)
    assert isinstance(s.margin, float)
    assert LossSettings.from_config({"margin": 15.0}) == LossSettings(15.0, "pair", "hinge", "sum", True)
    assert LossSettings.from_config({"margin": 1.0, "distance": "squared"}).squared is True
    with pytest.raises(ImemError, match=r"train cfm = 'x' is not one of: hinge, contrastive"):
        LossSettings(cfm="x")


def test_sigma_of_averages_only_the_pairs_eq1_can_invert():
    """sigma = d / -log S over the pairs with 0 < S < 1 - 1e-6 and d > 0: S = 0 (no finite sigma), S = 1 or within
    1e-6 of it (log S ~ 0; 1 - 1e-6 itself too) and d = 0 are left out; none left -> 1."""
    d = torch.tensor([0.2, 0.6, 0.3, 0.5, 0.4, 0.0, 0.7, 0.9], dtype=torch.float64)
    s = torch.tensor([math.exp(-0.2 / 0.5), math.exp(-0.6 / 0.2), 0.0, 1.0, 1 - 5e-7, 0.3, 1 - 2e-6, 1 - 1e-6],
                     dtype=torch.float64)
    want = (0.5 + 0.2 + 0.7 / -math.log(1 - 2e-6)) / 3
    assert sigma_of(s, d).item() == pytest.approx(want, rel=1e-9)
    none = sigma_of(torch.tensor([0.0, 1.0]), torch.tensor([0.3, 0.3]))
    assert none.item() == 1.0 and none.dtype == torch.float32


def test_cfr_pair_with_two_pairs_by_hand():
    """The smallest batch with a neighbour: each anchor has its partner and the one other item (B = 2); a single
    pair has no neighbour and contributes 0."""
    fi, fm = torch.tensor([[0.0], [3.0]]), torch.tensor([[1.0], [1.0]])
    yi, ym = torch.tensor([[0.1], [0.7]]), torch.tensor([[0.2], [0.3]])
    img = [((L(1) - L(1)) - (L(0.01) - L(0.04))) ** 2, ((L(4) - L(4)) - (L(0.16) - L(0.25))) ** 2]
    mus = [((L(1) - L(4)) - (L(0.01) - L(0.25))) ** 2, ((L(4) - L(1)) - (L(0.16) - L(0.04))) ** 2]
    got = cfr_loss(fi, fm, yi, ym, LossSettings(cfr="pair", reduction="sum")).item()
    assert got == pytest.approx(sum(img) + sum(mus), rel=1e-5)
    one = cfr_loss(fi[:1], fm[:1], yi[:1], ym[:1], LossSettings(cfr="pair", reduction="sum"))
    assert one.item() == 0.0


def test_cfm_hinge_per_pair_norm_and_contrastive_guard():
    """The hinge takes each pair's own norm of the difference (not the batch's), and the contrastive form's d
    has the 1e-4 / dim guard under the root: d^2 = 25 + 1e-4 / 2 for a pair at distance 5."""
    fi = torch.tensor([[1.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    fm = fi + torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])  # distances 5, 1, 0
    assert cfm_loss(fi, fm, torch.ones(3), margin=0.5, reduction="sum").item() == pytest.approx(4.5 + 0.5, rel=1e-6)
    assert cfm_loss(fi, fm, torch.ones(3), margin=0.5, reduction="mean").item() == pytest.approx(5.0 / 3, rel=1e-6)
    d5, d1 = math.sqrt(25 + 1e-4 / 2), math.sqrt(1 + 1e-4 / 2)
    got = cfm_loss(fi[:2], fm[:2], torch.tensor([0.5, 0.0]), margin=5.5, form="contrastive", reduction="sum").item()
    assert got == pytest.approx(0.5 * d5 * d5 + 0.5 * (5.5 - d5) ** 2 + (5.5 - d1) ** 2, rel=1e-6)


def test_cdcml_losses_route_each_output_to_its_loss_and_settings():
    """Each of the seven entries is its loss of the right tensors under the given settings (a margin, either
    reduction, plain or squared distances, either CFM form), and only the active ones are computed."""
    g = torch.Generator().manual_seed(5)
    out = {"f_image": torch.randn(5, 3, generator=g, dtype=torch.float64), "f_music": torch.randn(5, 3, generator=g),
           "sim": torch.rand(5, generator=g), "va_image": torch.rand(5, 2, generator=g),
           "va_music": torch.rand(5, 2, generator=g)}
    batch = {"image_va": torch.rand(5, 2, generator=g), "music_va": torch.rand(5, 2, generator=g),
             "score": torch.rand(5, generator=g)}
    fi, fm = out["f_image"].float(), out["f_music"]
    yi, ym, s = batch["image_va"], batch["music_va"], batch["score"]
    d2 = ((fi - fm) ** 2).sum(1)
    for st, cfm in ((LossSettings(margin=0.7, cfm="contrastive", reduction="mean", squared=False),
                     (s * d2 + (1 - s) * (0.7 - (d2 + 1e-4 / 3).sqrt()).clamp_min(0) ** 2).mean()),
                    (LossSettings(margin=1.1, cfm="hinge", reduction="sum", squared=True),
                     (d2.sqrt() - 1.1).clamp_min(0).sum())):
        got = cdcml_losses(out, batch, st)
        want = {
            "cfr": cfr_loss(fi, fm, yi, ym, st),
            "cfm": cfm,
            "sfr_image": sfr_loss(fi, yi, squared=st.squared, reduction=st.reduction),
            "sfr_music": sfr_loss(fm, ym, squared=st.squared, reduction=st.reduction),
            "sim": ((out["sim"] - s) ** 2).mean(),
            "va_image": ((out["va_image"] - yi) ** 2).sum(1).mean(),
            "va_music": ((out["va_music"] - ym) ** 2).sum(1).mean(),
        }
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == torch.float32, k
            assert got[k].item() == pytest.approx(v.item(), rel=1e-4, abs=1e-6), k
        assert got["sfr_image"].item() != pytest.approx(got["sfr_music"].item(), rel=1e-3)
        assert cfm.item() > 0.1 and got["sfr_image"].item() > 1e-3
    assert set(cdcml_losses(out, batch, st, active=("sim", "cfm"))) == {"sim", "cfm"}


def test_first_batch_mode_keeps_a_zero_first_value_at_one_and_default_weights():
    """A loss that is 0 on the first batch is divided by 1 from then on (not by 0), a loss the weights do not
    name weighs 1, and the first value is taken once."""
    fb = LossCombiner("first_batch", {"a": 3.0})
    assert fb({"a": torch.tensor(2.0), "b": torch.tensor(0.0)}).item() == pytest.approx((3 * 1 + 0) / 4)
    assert fb({"a": torch.tensor(1.0), "b": torch.tensor(0.6)}).item() == pytest.approx((3 * 0.5 + 0.6) / 4)
    assert fb.state_dict()["first"] == {"a": 2.0, "b": 1.0}
    tiny = LossCombiner("first_batch")
    tiny({"a": torch.tensor(1e-11)})
    assert tiny.state_dict()["first"] == {"a": pytest.approx(1e-11)}
    with pytest.raises(ImemError, match="loss_mode = 'x' is not one of: sum, first_batch"):
        LossCombiner("x")
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss: sim = nan, cfr = inf$"):
        LossCombiner("first_batch")({"sim": torch.tensor(float("nan")), "cfr": torch.tensor(float("inf")),
                                     "cfm": torch.tensor(1.0)})
    # a first value at or below 1e-12 counts as 0
    edge = LossCombiner("first_batch")
    edge({"a": torch.tensor(1e-12, dtype=torch.float64)})
    assert edge.state_dict()["first"] == {"a": 1.0}


def test_cfr_pair_with_plain_distances_and_a_coinciding_pair_by_hand():
    """``distance: euclidean`` on both sides of eq. 2 (embeddings with the 1e-4 / dim guard, labels with it too,
    as pairwise_distance applies it), and a pair whose embeddings coincide (D = 0: log(0 + 1e-6), finite)."""
    from imem.losses import partner_log_ratio

    e = 1e-4  # the guard, 1e-4 / dim with dim = 1
    fi, fm, yi, ym = ([float(v) for v in t[:, 0]] for t in (FI, FM, YI, YM))
    plain = 0.0
    for fa, fb, ya, yb in ((fi, fm, yi, ym), (fm, fi, ym, yi)):
        for i in range(3):
            for j in range(3):
                if j != i:
                    x = L(math.sqrt((fa[i] - fb[i]) ** 2 + e)) - L(math.sqrt((fa[i] - fb[j]) ** 2 + e))
                    t = L(math.sqrt((ya[i] - yb[i]) ** 2 + e)) - L(math.sqrt((ya[i] - yb[j]) ** 2 + e))
                    plain += (x - t) ** 2 / 2
    got = cfr_loss(FI, FM, YI, YM, LossSettings(cfr="pair", reduction="sum", squared=False)).item()
    assert got == pytest.approx(plain, rel=1e-5)
    # the partner's default is the paper's squared distance and the mean over anchors
    sq_total, sq_mean = _eq2_by_hand(lambda a, p, o: L((a - p) ** 2) - L((a - o) ** 2))
    half = partner_log_ratio(FI, FM, YI, YM).item() + partner_log_ratio(FM, FI, YM, YI).item()
    assert half == pytest.approx(sq_mean, rel=1e-5)
    # image 0 and its music partner at the same point
    fi0, fm0 = torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [1.0]])
    yi0, ym0 = torch.tensor([[0.1], [0.7]]), torch.tensor([[0.2], [0.3]])
    img = [((L(0) - L(1)) - (L(0.01) - L(0.04))) ** 2, ((L(1) - L(4)) - (L(0.16) - L(0.25))) ** 2]
    mus = [((L(0) - L(4)) - (L(0.01) - L(0.25))) ** 2, ((L(1) - L(1)) - (L(0.16) - L(0.04))) ** 2]
    got = cfr_loss(fi0, fm0, yi0, ym0, LossSettings(cfr="pair", reduction="sum")).item()
    assert math.isfinite(got) and got == pytest.approx(sum(img) + sum(mus), rel=1e-5)


def test_losses_keep_the_embeddings_dtype_and_sigma_the_distances():
    """float64 VA labels (the batch's) with float32 embeddings: the CFR loss stays float32; sigma_of takes the log
    of S in the distances' precision and its fallback has their dtype."""
    y64i, y64m = YI.double(), YM.double()
    for form in ("pair", "literal"):
        score = torch.exp(-(y64i - y64m).abs()[:, 0] / 0.3).float()
        loss = cfr_loss(FI, FM, y64i, y64m, LossSettings(cfr=form), score=score)
        assert loss.dtype == torch.float32, form
    s32 = torch.tensor([0.3, 0.55, 0.8])
    d64 = torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64)
    want = sum(float(d) / -math.log(float(s)) for d, s in zip(d64, s32, strict=True)) / 3  # float64 logs of the float32 S
    assert sigma_of(s32, d64).item() == pytest.approx(want, rel=1e-13)
    assert sigma_of(torch.tensor([1.0]), torch.tensor([0.5], dtype=torch.float64)).dtype == torch.float64


def test_contrastive_guard_is_per_embedding_dimension():
    # coinciding pairs with S = 1: d^2 = 1e-4 / dim each (dim 2, batch 3)
    got = cfm_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3), margin=0.0, form="contrastive", reduction="sum")
    assert got.item() == pytest.approx(3 * 1e-4 / 2, rel=1e-5)


def _dense_half_by_brute_force(fa, fb, ya, yb, squared, reduction):
    """Kim et al.'s dense log-ratio of anchors ``a`` over every neighbour pair j < k of ``b``, from explicit
    element-wise distances in float64 (the plain form with the 1e-4 / dim guard)."""
    def dist(u, v):
        d2 = float(((u.double() - v.double()) ** 2).sum())
        return d2 if squared else math.sqrt(d2 + 1e-4 / u.shape[-1])

    per_anchor = []
    for i in range(len(fa)):
        terms = [((L(dist(fa[i], fb[j])) - L(dist(fa[i], fb[k]))) - (L(dist(ya[i], yb[j])) - L(dist(ya[i], yb[k])))) ** 2
                 for j in range(len(fb)) for k in range(j + 1, len(fb))]
        per_anchor.append(sum(terms) / len(terms))
    return sum(per_anchor) if reduction == "sum" else sum(per_anchor) / len(per_anchor)


def test_cfr_dense_adds_both_halves_under_the_settings():
    """cfr: dense = the image-anchor half + the music-anchor half, each with the settings' distance and
    reduction; an image coinciding with a music embedding (D = 0) stays finite; float64 labels keep float32."""
    g = torch.Generator().manual_seed(9)
    fi, fm = torch.randn(3, 2, generator=g), torch.randn(4, 2, generator=g)
    fm[1] = fi[0]
    yi, ym = torch.rand(3, 2, generator=g, dtype=torch.float64), torch.rand(4, 2, generator=g, dtype=torch.float64)
    for squared, reduction in ((False, "sum"), (True, "sum"), (False, "mean")):
        want = (_dense_half_by_brute_force(fi, fm, yi, ym, squared, reduction)
                + _dense_half_by_brute_force(fm, fi, ym, yi, squared, reduction))
        got = cfr_loss(fi, fm, yi, ym, LossSettings(cfr="dense", reduction=reduction, squared=squared))
        assert got.dtype == torch.float32 and math.isfinite(got.item())
        assert got.item() == pytest.approx(want, rel=2e-5), (squared, reduction)


def test_regression_losses_keep_the_predictions_dtype():
    # the batch's targets may be float64 (S and VA from the pair tables); the losses stay in the model's float32
    pred, va = torch.tensor([0.5, 1.0]), torch.tensor([[0.3, 0.4], [0.5, 0.6]])
    assert mse(pred, torch.tensor([0.0, 1.0], dtype=torch.float64)).dtype == torch.float32
    assert va_mse(va, torch.zeros(2, 2, dtype=torch.float64)).dtype == torch.float32
    assert va_mse(va, torch.zeros(2, 2, dtype=torch.float64)).item() == pytest.approx((0.25 + 0.61) / 2)
