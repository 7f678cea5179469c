"""Emo-CLIM (imem.methods.emo_clim): the SupCon loss, the per-class retrieval metrics and their chance
level against hand-worked values and brute force, the settings checks, and a short training run."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from imem.data.synth import IMAGE_TO_MUSIC_EMOTION
from imem.errors import ImemError
from imem.methods import emo_clim
from imem.methods.base import CHANCE_ROW, COLUMNS
from imem.methods.emo_clim import class_chance, class_retrieval, settings, supcon
from imem.metrics import expected_reciprocal_rank as chance_mrr


def loop_supcon(za, ya, zc, yc, t, intra):
    """Emo-CLIM eqs. 2 and 4 (Khosla et al.'s L_out) written out with plain loops (self excluded when intra):
    -1/N sum over ALL N anchors; an anchor without a positive adds 0 (the reference code's clamped |P(i)|)."""
    per_anchor = []
    for i, (a, y) in enumerate(zip(za, ya, strict=True)):
        others = [j for j in range(len(zc)) if not (intra and j == i)]
        pos = [j for j in others if yc[j] == y]
        if not pos:
            per_anchor.append(0.0)
            continue
        dot = {j: sum(u * v for u, v in zip(a, zc[j], strict=True)) / t for j in others}
        denom = sum(math.exp(dot[j]) for j in others)
        per_anchor.append(-sum(math.log(math.exp(dot[p]) / denom) for p in pos) / len(pos))
    return sum(per_anchor) / len(per_anchor)


def unit(*angles_deg):
    return [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in angles_deg]


def T(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def test_supcon_one_anchor_by_hand():
    # anchor (1,0) vs candidates (1,0), (0,1), (-1,0); t = 0.5 -> logits 2, 0, -2; the one positive is the first:
    # -log(e^2 / (e^2 + 1 + e^-2)) = log(1 + e^-2 + e^-4) = 0.142932...
    loss = supcon(T([[1.0, 0.0]]), T([0]), T([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), T([0, 1, 1]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2) + math.exp(-4)), abs=1e-12)
    assert loss.item() == pytest.approx(0.142932, abs=1e-6)


def test_supcon_cross_modal_matches_loops_and_counts_anchors_without_positive_in_n():
    za, ya = unit(0, 90, 53.13, 200), [0, 1, 0, 2]  # class 2 has no candidate: adds 0, counts in N
    zc, yc = unit(10, 100, 180, 300), [0, 1, 1, 0]
    got = supcon(T(za), T(ya), T(zc), T(yc), 0.07).item()
    assert got == pytest.approx(loop_supcon(za, ya, zc, yc, 0.07, intra=False), rel=1e-10)
    # eq. 2's -1/N: the three anchors with a positive, summed, over N = 4 (not over the 3 that have one)
    assert got == pytest.approx(supcon(T(za[:3]), T(ya[:3]), T(zc), T(yc), 0.07).item() * 3 / 4, rel=1e-12)
    assert got > 0
    # no anchor with a positive: 0, and a finite gradient
    z = T(za[3:]).requires_grad_(True)
    loss = supcon(z, T([2]), T(zc), T(yc), 0.07)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_supcon_intra_modal_excludes_self():
    # two anchors of one class: each one's only other candidate is its positive -> exactly 0 (with the anchor
    # itself in A(i) and P(i) it would not be)
    assert supcon(T(unit(0, 70)), T([3, 3]), temperature=0.07).item() == pytest.approx(0.0, abs=1e-12)
    za, ya = unit(0, 40, 95, 180, 260), [0, 0, 1, 1, 2]  # the class-2 anchor has no positive: 0, in N
    z = T(za).requires_grad_(True)
    loss = supcon(z, T(ya), temperature=0.2)
    assert loss.item() == pytest.approx(loop_supcon(za, ya, za, ya, 0.2, intra=True), rel=1e-10)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_supcon_intra_modal_without_any_positive_is_a_finite_zero():
    # every anchor alone in its class: the diagonal's finfo.min must not turn the 0 into NaN (-inf * 0)
    for dtype in (torch.float32, torch.float64):
        z = T(unit(0, 70, 200), dtype).requires_grad_(True)
        loss = supcon(z, T([0, 1, 2], torch.long), temperature=0.07)
        assert torch.isfinite(loss) and loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(z.grad).all() and not z.grad.any()
    # inside the four-term total: finite, and the other terms still train
    zi, zm = T(unit(0, 90), torch.float32).requires_grad_(True), T(unit(10, 100), torch.float32).requires_grad_(True)
    terms = emo_clim.emo_clim_losses(zi, T([0, 1], torch.long), zm, T([0, 1], torch.long), 0.07)
    assert terms["i2i"].item() == 0.0 and terms["m2m"].item() == 0.0
    total = emo_clim.weighted_total(terms, settings({})["loss_weights"])
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(zi.grad).all() and zi.grad.abs().sum() > 0


def test_balanced_batch_draws_classes_uniformly_then_items():
    # skewed toy labels: class 0 has 90 items, class 4 has 9, class 7 has 1 (codes need not be contiguous)
    labels = torch.tensor([0] * 90 + [4] * 9 + [7])
    draws = [emo_clim.balanced_batch(labels, 64, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])  # reproducible for a seed
    g = torch.Generator().manual_seed(3)
    batches = [emo_clim.balanced_batch(labels, 64, g) for _ in range(300)]
    assert torch.equal(batches[0], draws[0]) and not torch.equal(batches[0], batches[1])  # new draw each step
    idx = torch.cat(batches)
    assert idx.dtype == torch.long and int(idx.min()) >= 0 and int(idx.max()) < len(labels)
    freq = torch.bincount(labels[idx], minlength=8).double() / len(idx)
    # 19,200 draws: each class 1/3 (binomial sd 0.0034), far from the item frequencies 0.90 / 0.09 / 0.01
    assert freq[[0, 4, 7]].tolist() == pytest.approx([1 / 3] * 3, abs=0.02)
    assert freq.sum().item() == pytest.approx(1.0)
    # within a class every item is drawn, about equally often (class 4: 9 items, ~711 draws each 1/9)
    within = torch.bincount(idx[labels[idx] == 4] - 90, minlength=9).double()
    assert (within > 0).all() and (within / within.sum() - 1 / 9).abs().max() < 0.04
    assert (idx == 99).sum() > 0.3 * len(idx)  # the lone class-7 item comes back with replacement
    assert not torch.equal(emo_clim.balanced_batch(labels, 64, torch.Generator().manual_seed(4)), draws[0])


def test_weighted_total_uses_the_weights():
    terms = {"i2i": T(1.0), "m2m": T(2.0), "i2m": T(3.0), "m2i": T(4.0)}
    assert emo_clim.weighted_total(terms, settings({})["loss_weights"]).item() == pytest.approx(2.5)
    w = {"i2i": 0.0, "m2m": 0.0, "i2m": 1.0, "m2i": 0.5}
    assert emo_clim.weighted_total(terms, w).item() == pytest.approx(5.0)


def test_class_retrieval_averages_per_class_then_across_classes():
    cand = np.array([0, 1, 0, 1])
    query = np.array([0, 0, 1, 2])  # class 2 has no candidate: skipped
    scores = np.array([[0.9, 0.1, 0.2, 0.3],   # ranks c0 c3 c2 c1 -> relevant 1 0 1 0: P@1 1, P@2 1/2, RR 1
                       [0.5, 0.9, 0.1, 0.2],   # c1 c0 c3 c2 -> 0 1 0 1: P@1 0, P@2 1/2, RR 1/2
                       [0.9, 0.1, 0.8, 0.7],   # c0 c2 c3 c1 -> 0 0 1 1: P@1 0, P@2 0, RR 1/3
                       [0.1, 0.2, 0.3, 0.4]])
    m, skipped = class_retrieval(scores, query, cand, ks=(1, 2))
    # class 0: P@1 1/2, P@2 1/2, MRR 3/4; class 1: 0, 0, 1/3 -> across classes (micro would give MRR 0.611)
    assert skipped == 1
    assert m == pytest.approx({"p1": 0.25, "p2": 0.25, "mrr": (0.75 + 1 / 3) / 2}, abs=1e-12)
    assert class_retrieval(scores[3:], query[3:], cand) == ({}, 1)  # no query left: no columns
    assert class_chance(query[3:], cand) == {}


@pytest.mark.parametrize("n,r", [(1, 1), (5, 1), (5, 2), (6, 3), (6, 6), (7, 2), (7, 4)])
def test_chance_mrr_closed_form_matches_brute_force(n, r):
    ranks = [1 / (1 + min(perm.index(j) for j in range(r))) for perm in itertools.permutations(range(n))]
    assert chance_mrr(n, r) == pytest.approx(float(np.mean(ranks)), abs=1e-12)


def test_chance_mrr_large_n_is_finite():
    assert chance_mrr(20000, 1) == pytest.approx(sum(1 / j for j in range(1, 20001)) / 20000, rel=1e-9)
    assert chance_mrr(20000, 20000) == pytest.approx(1.0, abs=1e-9)


def test_class_chance_is_the_mean_over_all_rankings():
    query, cand = np.array([0, 0, 1, 2, 1]), np.array([0, 1, 0, 1, 1])
    ks = (1, 5, 7)  # k = 7 > 5 candidates: P@7 = hits / 7
    runs = [class_retrieval(np.tile(np.array(p, float), (len(query), 1)), query, cand, ks)[0]
            for p in itertools.permutations(range(len(cand)))]
    brute = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    assert class_chance(query, cand, ks) == pytest.approx(brute, abs=1e-12)
    assert class_chance(query, cand)["p1"] == pytest.approx((2 / 5 + 3 / 5) / 2)


def loop_intra(scores, cls, queries):
    """Intra-modal P@1, P@5 and MRR with loops: each drawn query (an index; repeats kept) ranks every OTHER
    classed item by score (ties: item order); per class, then across classes; a query alone in its class is
    skipped."""
    pool = [j for j in range(len(cls)) if cls[j] >= 0]
    per_class = {}
    for q in queries:
        if cls[q] < 0:
            continue
        cands = [j for j in pool if j != q]
        if not any(cls[j] == cls[q] for j in cands):
            continue
        ranked = sorted(cands, key=lambda c: (-scores[q][c], c))
        rel = [cls[c] == cls[q] for c in ranked]
        per_class.setdefault(cls[q], []).append((sum(rel[:1]), sum(rel[:5]) / 5, 1 / (rel.index(True) + 1)))
    means = [np.mean(v, axis=0) for v in per_class.values()]
    return dict(zip(("p1", "p5", "mrr"), np.mean(means, axis=0), strict=True))


def test_intra_modal_retrieval_leaves_the_query_out_and_matches_loops():
    # Emo-CLIM section 5.1.2 / table 1: image->image and music->music retrieval
    rng = np.random.default_rng(5)
    cls = np.array([0, 0, 1, 1, 1, 2, -1, 0, 1])  # class 2 alone: its query is skipped; -1 unclassed
    s = rng.uniform(size=(9, 9))
    s[np.diag_indices(9)] = 5.0  # a query's own score is the highest: it would be its own first hit
    dummy = np.zeros((1, 9))  # one clip (class 0) x the 9 images
    classes = emo_clim.ClassRankings(dummy, cls, np.array([0]), scores_ii=s)
    row, skipped = classes.row(np.array([0]), np.arange(9))
    want = loop_intra(s, cls, range(9))
    assert [row[f"cls_i2i_{m}"] for m in ("p1", "p5", "mrr")] == pytest.approx(list(want.values()), abs=1e-12)
    assert skipped["i2i"] == 1 and row["cls_i2i_p1"] < 1.0  # with the query counted, P@1 would be 1
    draw = np.array([8, 0, 0, 5, 6, 3])  # repeats, the lone class-2 item, an unclassed one
    row, skipped = classes.row(np.array([0]), draw)
    want = loop_intra(s, cls, draw)
    assert [row[f"cls_i2i_{m}"] for m in ("p1", "p5", "mrr")] == pytest.approx(list(want.values()), abs=1e-12)
    assert skipped["i2i"] == 1
    # the chance row: the mean over every ranking of the other items (7 classed items: all 5,040 orders)
    k = np.flatnonzero(cls >= 0)
    runs = [class_retrieval(np.tile(np.array(p, float), (len(k), 1)), cls[k], cls[k], own=np.eye(len(k), dtype=bool))[0]
            for p in itertools.permutations(range(len(k)))]
    brute = {m: float(np.mean([r[m] for r in runs])) for m in runs[0]}
    assert class_chance(cls[k], cls[k], intra=True) == pytest.approx(brute, abs=1e-12)


def test_class_codes_map_the_image_taxonomy_and_drop_the_rest():
    img = pd.DataFrame({"emotion": ["fear", "awe", "excitement", None]})
    mus = pd.DataFrame({"emotion": ["scary", "tender", "exciting"]})
    c = emo_clim.CLASSES
    assert emo_clim.class_codes(img, "image", "test").tolist() == [c.index("scary"), -1, c.index("exciting"), -1]
    assert emo_clim.class_codes(mus, "music", "test").tolist() == [c.index("scary"), -1, c.index("exciting")]
    with pytest.raises(ImemError, match="emotion"):
        emo_clim.class_codes(pd.DataFrame({"x": [1]}), "music", "val")


def test_settings_fill_defaults_and_refuse_bad_values():
    assert settings({"seed": 1}) == emo_clim.DEFAULTS
    assert settings({"loss_weights": {"i2m": 1.0}})["loss_weights"] == {"i2i": 0.25, "m2m": 0.25, "i2m": 1.0, "m2i": 0.25}
    for bad, key in (({"temperature": 0}, "temperature"), ({"dropout": 1.0}, "dropout"), ({"epochs": 0}, "epochs"),
                     ({"batch_size": 1}, "batch_size"), ({"lr": -1e-3}, "lr"), ({"loss_weights": {"x2y": 1}}, "x2y"),
                     ({"loss_weights": {"i2i": 0, "m2m": 0, "i2m": 0, "m2i": 0}}, "loss_weights"),
                     ({"loss_weights": {"m2i": -1}}, "loss_weights.m2i"), ({"standardize": "yes"}, "standardize"),
                     ({"cpu_threads": -1}, "cpu_threads"), ({"cpu_threads": True}, "cpu_threads"),
                     ({"lr": math.nan}, "lr"), ({"lr": True}, "lr")):
        with pytest.raises(ImemError, match=rf"methods\.emo_clim.*{key}") as e:
            settings(bad)
        assert "\n" not in str(e.value)


# --- bootstrap rescoring (issue 14) ---------------------------------------------------------------------

class StubData:
    """What :func:`emo_clim.fit_evaluate` reads of a :class:`MethodData`, without a feature store: split
    tables with emotions and VA, class-informative stand-in backbone features, and the true S."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        img_emo = list(IMAGE_TO_MUSIC_EMOTION)  # excitement .. fear
        mus_emo = list(IMAGE_TO_MUSIC_EMOTION.values())  # exciting .. scary
        # test: an image outside the six classes (awe: dropped), "fear" images but no "scary" clip (skipped
        # i2m queries), a clip outside the six classes (tender: dropped)
        emotions = {"train": (img_emo * 5, mus_emo * 6), "val": (img_emo * 2, mus_emo * 2),
                    "test": (img_emo[:5] * 2 + ["awe", "fear", "fear"], mus_emo[:5] * 3 + ["tender"])}
        self.images, self.clips, self._x = {}, {}, {}
        proto = {side: rng.normal(size=(len(emo_clim.CLASSES), 12)) for side in ("image", "music")}
        for split, (ie, me) in emotions.items():
            for side, emo, store in (("image", ie, self.images), ("music", me, self.clips)):
                t = pd.DataFrame({"emotion": emo, "valence": rng.uniform(-1, 1, len(emo)),
                                  "arousal": rng.uniform(-1, 1, len(emo))})
                store[split] = t
                codes = emo_clim.class_codes(t, side, split)
                x = proto[side][np.maximum(codes, 0)] + 0.7 * rng.normal(size=(len(t), 12))
                self._x[side, split] = torch.tensor(x, dtype=torch.float32)

    def frozen(self, side, spec, seed, split, device="cpu", progress=True):
        return self._x[side, split].clone()

    def truth(self, split):
        from imem.data.pairs import similarity_matrix

        va = [t[split][["valence", "arousal"]].to_numpy(np.float32).copy() for t in (self.clips, self.images)]
        return similarity_matrix(*va, sigma=1.0)


@pytest.fixture(scope="module")
def stub_result():
    from imem.methods.base import RunContext

    cfg = {"seed": 3, "n_seeds": 2, "device": "cpu", "image_encoder": {}, "music_encoder": {}, "epochs": 2,
           "batch_size": 8, "hidden": 16, "proj_dim": 8}
    data = StubData()
    return emo_clim.fit_evaluate(cfg, data, RunContext(split="test", progress=False)), data


def test_rescore_of_the_identity_resample_reproduces_the_rows(stub_result):
    result, data = stub_result
    assert result.rescore is not None and result.notes["skipped_i2m_queries"] == 2
    n_clips, n_images = len(data.clips["test"]), len(data.images["test"])
    got = result.rescore(np.arange(n_clips), np.arange(n_images))
    want = {k: v for k, v in result.rows.items() if k != CHANCE_ROW}
    assert list(got) == list(want) == [emo_clim.LABEL]
    assert list(got[emo_clim.LABEL]) == list(want[emo_clim.LABEL])  # the same columns, cls_* and *_emb_*
    assert len(want[emo_clim.LABEL]) == 22  # cls_{i2m,m2i,i2i,m2m}_{p1,p5,mrr} + {m2i,i2m}_emb_{ndcg10,r1,r5,r10,mrr}
    assert got[emo_clim.LABEL] == pytest.approx(want[emo_clim.LABEL], abs=1e-9)
    # a real resample: other values, the same columns, all finite here
    other = result.rescore(np.repeat(np.arange(n_clips), 1 + np.arange(n_clips) % 2), np.arange(1, n_images))
    assert list(other[emo_clim.LABEL]) == list(want[emo_clim.LABEL])
    assert all(math.isfinite(v) for v in other[emo_clim.LABEL].values())
    assert other[emo_clim.LABEL] != pytest.approx(want[emo_clim.LABEL], abs=1e-9)


def hand_arrays(seed: int = 7):
    """Scores, true S and class codes of a split of 8 clips and 7 images (-1: an item outside the classes;
    image class 4 has no clip: skipped i2m queries; clip class 3 no image: a skipped m2i query)."""
    from imem.data.pairs import similarity_matrix

    rng = np.random.default_rng(seed)
    clip_cls = np.array([0, 1, 1, 2, -1, 0, 3, 1])
    image_cls = np.array([0, 1, 2, -1, 4, 1, 0])
    scores = rng.uniform(0, 1, (8, 7))
    scores[:, 6] = scores[:, 0]  # tied candidates: ranked in candidate order
    truth = similarity_matrix(rng.uniform(-1, 1, (8, 2)), rng.uniform(-1, 1, (7, 2)), 0.8).astype(np.float64)
    return scores, truth, image_cls, clip_cls


def loop_class_metrics(scores, query_cls, cand_cls):
    """P@1, P@5 and MRR written out with loops: per query its candidates sorted by score (ties: candidate
    order), per class the mean over its queries, then the mean over classes (queries without a same-class
    candidate left out)."""
    per_class = {}
    for q, yq in enumerate(query_cls):
        if yq not in set(cand_cls):
            continue
        ranked = sorted(range(len(cand_cls)), key=lambda c: (-scores[q][c], c))
        rel = [cand_cls[c] == yq for c in ranked]
        per_class.setdefault(yq, []).append((sum(rel[:1]) / 1, sum(rel[:5]) / 5, 1 / (rel.index(True) + 1)))
    means = [np.mean(v, axis=0) for v in per_class.values()]
    return dict(zip(("p1", "p5", "mrr"), np.mean(means, axis=0), strict=True))


def test_rescore_of_a_resample_with_duplicates_equals_brute_force():
    from imem.metrics import retrieval

    scores, truth, image_cls, clip_cls = hand_arrays()
    thr, k = 0.7, 10
    full, skipped = emo_clim.resample_row(scores, truth, image_cls, clip_cls, np.arange(8), np.arange(7), thr, k)
    assert skipped == {"i2m": 1, "m2i": 1}
    rescore = emo_clim.rescorer(scores, truth, image_cls, clip_cls, thr, k, list(full))
    # clip 1 and image 2 not drawn, clips 0 and 3, images 1 and 6 drawn twice, clip 6 (its class 3 only) not
    # drawn, the unclassed clip 4 and image 3 drawn; an unsorted draw
    ci = np.array([3, 0, 0, 2, 3, 4, 5, 7])
    ii = np.array([6, 0, 1, 1, 3, 4, 5, 6])
    got = rescore(ci, ii)[emo_clim.LABEL]
    assert list(got) == list(full)

    # materialised by hand: the drawn queries (repeats kept) x the split's WHOLE candidate pool
    m2i_S = np.array([[scores[c][i] for i in range(7)] for c in ci])  # drawn clips x all 7 images
    m2i_T = np.array([[truth[c][i] for i in range(7)] for c in ci])
    i2m_S = np.array([[scores[c][i] for c in range(8)] for i in ii])  # drawn images x all 8 clips
    i2m_T = np.array([[truth[c][i] for c in range(8)] for i in ii])
    # class columns: the classed drawn queries x all classed candidates of the split
    qc = [j for j in range(len(ci)) if clip_cls[ci[j]] >= 0]
    qi = [j for j in range(len(ii)) if image_cls[ii[j]] >= 0]
    pc = [c for c in range(8) if clip_cls[c] >= 0]  # clips 0 1 2 3 5 6 7
    pi = [i for i in range(7) if image_cls[i] >= 0]  # images 0 1 2 4 5 6
    yqc, yqi = np.array([clip_cls[ci[j]] for j in qc]), np.array([image_cls[ii[j]] for j in qi])
    ypc, ypi = clip_cls[pc], image_cls[pi]
    cls_i2m_S, cls_m2i_S = i2m_S[qi][:, pc], m2i_S[qc][:, pi]
    i2m, skip_i2m = class_retrieval(cls_i2m_S, yqi, ypc)
    m2i, skip_m2i = class_retrieval(cls_m2i_S, yqc, ypi)
    # skipped: the class-4 image (no class-4 clip in the split); no clip (class 2 still has image 2 as a
    # candidate, though image 2 was not drawn)
    assert (skip_i2m, skip_m2i) == (1, 0) and len(np.unique(yqi)) == 3
    want = {**{f"cls_i2m_{m}": v for m, v in i2m.items()}, **{f"cls_m2i_{m}": v for m, v in m2i.items()}}
    for short, s, t in (("m2i", m2i_S, m2i_T), ("i2m", i2m_S, i2m_T)):
        m = retrieval(s, t, thr, k_ndcg=k)
        want.update({f"{short}_emb_{n}": m[n] for n in ("ndcg10", "r1", "r5", "r10", "mrr")})
    assert got == pytest.approx(want, abs=1e-12, nan_ok=True)
    assert got != pytest.approx(full, abs=1e-6, nan_ok=True)  # the resample does change the values
    # and the class columns against plain loops
    loops = loop_class_metrics(cls_i2m_S, yqi, ypc)
    assert [got[f"cls_i2m_{m}"] for m in ("p1", "p5", "mrr")] == pytest.approx(list(loops.values()), abs=1e-12)
    loops = loop_class_metrics(cls_m2i_S, yqc, ypi)
    assert [got[f"cls_m2i_{m}"] for m in ("p1", "p5", "mrr")] == pytest.approx(list(loops.values()), abs=1e-12)
    # no candidate duplicated: a query drawn twice contributes the same value twice, the single draw's
    one = rescore(np.array([0]), np.array([0]))[emo_clim.LABEL]
    two = rescore(np.array([0, 0]), np.array([0, 0]))[emo_clim.LABEL]
    assert two == pytest.approx(one, abs=1e-12, nan_ok=True)


def test_rescore_gives_nan_where_a_resample_leaves_a_metric_undefined():
    scores, truth, image_cls, clip_cls = hand_arrays()
    full, _ = emo_clim.resample_row(scores, truth, image_cls, clip_cls, np.arange(8), np.arange(7), 0.7, 10)
    rescore = emo_clim.rescorer(scores, truth, image_cls, clip_cls, 0.7, 10, list(full))
    # only the class-4 image, twice: no i2m query has a same-class clip; the m2i queries (all clips drawn)
    # still rank all the split's images: those columns are the full split's
    got = rescore(np.arange(8), np.array([4, 4]))[emo_clim.LABEL]
    assert list(got) == list(full)
    assert all(math.isnan(v) for c, v in got.items() if c.startswith("cls_i2m_"))
    assert {c: v for c, v in got.items() if c.startswith(("cls_m2i_", "m2i_emb_"))} == pytest.approx(
        {c: v for c, v in full.items() if c.startswith(("cls_m2i_", "m2i_emb_"))}, abs=1e-12)
    # one clip, 2 (class 1, no image with S > 0.7): m2i R@k and MRR undefined; nDCG defined; it still
    # ranks all 7 images (4 classed candidates other than class 1), the i2m columns are the full split's
    got = rescore(np.array([2]), np.arange(7))[emo_clim.LABEL]
    assert list(got) == list(full)
    assert all(math.isnan(got[f"m2i_emb_{m}"]) for m in ("r1", "r5", "r10", "mrr"))
    assert math.isfinite(got["m2i_emb_ndcg10"])
    assert {c: v for c, v in got.items() if "i2m" in c} == pytest.approx(
        {c: v for c, v in full.items() if "i2m" in c}, abs=1e-12, nan_ok=True)
    assert all(math.isfinite(got[f"cls_m2i_{m}"]) for m in ("p1", "p5", "mrr"))


def test_rescore_time_on_a_test_split_sized_draw():
    """793 clips x 810 images (the embedded corpus's test split of issue 14; now 1,513 x 1,800): one resample well under a second (generous
    bound here: the machine may be busy), so 1,000 resamples per seed stay affordable."""
    import time

    rng = np.random.default_rng(0)
    nc, ni = 793, 810
    scores, truth = rng.uniform(size=(nc, ni)), rng.uniform(0.3, 1.0, size=(nc, ni))
    clip_cls, image_cls = rng.integers(0, 5, nc), rng.integers(0, 6, ni)
    full, _ = emo_clim.resample_row(scores, truth, image_cls, clip_cls, np.arange(nc), np.arange(ni), 0.7, 10)
    rescore = emo_clim.rescorer(scores, truth, image_cls, clip_cls, 0.7, 10, list(full))
    draws = [(np.sort(rng.integers(0, nc, nc)), np.sort(rng.integers(0, ni, ni))) for _ in range(5)]
    t0 = time.perf_counter()
    for ci, ii in draws:
        rescore(ci, ii)
    assert (time.perf_counter() - t0) / len(draws) < 1.0


# --- a short training run on the embedded corpus -----------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from corpus_fixtures import synth_pipeline
    from imem.methods.base import run_method
    from imem.params import section

    tmp = synth_pipeline(tmp_path_factory.mktemp("emo_clim"))
    methods = {"common": {"seed": 1, "device": "cpu", "image_encoder": "resnet18", "music_encoder": "resnet18"},
               "emo_clim": {"epochs": 3, "batch_size": 16, "lr": 1e-3}}
    # scored on train: the fixture's test split (7 images, 13 clips of two classes) is too small to show learning
    ev = dict(section("evaluate"), split="train", bootstrap={"n": 50, "seed": 2026, "level": 0.95})
    memo, out, threads = {}, [], torch.get_num_threads()
    for i in range(2):
        m = run_method("emo_clim", methods, ev, tmp / "prepare", tmp / "features", tmp / "rep" / "stats.json",
                       tmp / f"models{i}", tmp / f"reports{i}", train_encoders=section("train")["encoders"],
                       track=False, progress=False, memo=memo)
        out.append((m, tmp / f"models{i}", tmp / f"reports{i}", tmp / "prepare" / ev["split"]))
        assert torch.get_num_threads() == threads  # cpu_threads is restored after the run
    return out


@pytest.mark.slow
def test_training_run_writes_valid_outputs_and_learns(runs):
    m, model_dir, report_dir, scored = runs[0]
    for f in (model_dir / "model.pt", report_dir / "metrics.json", report_dir / "history.csv", report_dir / "results.md"):
        assert f.is_file(), f
    assert torch.load(model_dir / "model.pt", weights_only=True)["config"]["method"] == "emo_clim"  # issue 16 item 1
    assert list(m["rows"]) == ["Emo-CLIM", CHANCE_ROW]
    cls_cols = {f"cls_{d}_{k}" for d in ("i2m", "m2i", "i2i", "m2m") for k in ("p1", "p5", "mrr")}
    emb_cols = {c for c in COLUMNS if "_emb_" in c}
    for row in m["rows"].values():
        assert set(row) == cls_cols | emb_cols
    hist = pd.read_csv(report_dir / "history.csv")
    assert list(hist["epoch"]) == [1, 2, 3]
    assert {"train/total", "train/i2i", "train/m2m", "train/i2m", "train/m2i", "val/total", "val/m2i"} <= set(hist)
    assert hist["train/total"].iloc[-1] < hist["train/total"].iloc[0]
    assert m["best_epoch"] == int(hist.loc[hist["val/total"].idxmin(), "epoch"])
    model, chance = m["rows"]["Emo-CLIM"], m["rows"][CHANCE_ROW]
    assert model["cls_i2m_mrr"] > chance["cls_i2m_mrr"] and model["cls_m2i_mrr"] > chance["cls_m2i_mrr"]
    # skipped queries, from the scored split's tables: images whose mapped class no clip of the split has,
    # and clips whose class no image of the split has
    images, clips = (pd.read_csv(scored / f) for f in ("images.csv", "clips.csv"))
    image_cls = images["emotion"].map(IMAGE_TO_MUSIC_EMOTION).dropna()
    clip_cls = clips["emotion"][clips["emotion"].isin(set(IMAGE_TO_MUSIC_EMOTION.values()))]
    assert m["n_dropped_items"] == 0 and len(image_cls) == len(images) and len(clip_cls) == len(clips)
    assert m["skipped_i2m_queries"] == int((~image_cls.isin(set(clip_cls))).sum())
    assert m["skipped_m2i_queries"] == int((~clip_cls.isin(set(image_cls))).sum())
    state = torch.load(model_dir / "model.pt", weights_only=False)
    assert state["image_head"]["net.4.weight"].shape == (128, 256)
    # bootstrap intervals for the model's row (not the chance row), every column, from the rescore closure
    from imem import bootstrap

    assert m["bootstrap"]["resamples"] == 50 and list(m["rows_ci"]) == ["Emo-CLIM"]
    reps, n, _ = bootstrap.load(report_dir / "bootstrap.npz")
    assert n == 50 and list(reps) == ["Emo-CLIM"] and set(reps["Emo-CLIM"]) == set(model)
    lo, hi = m["rows_ci"]["Emo-CLIM"]["lo"], m["rows_ci"]["Emo-CLIM"]["hi"]
    assert set(lo) == set(hi) == set(model) and all(lo[c] <= hi[c] for c in lo)


@pytest.mark.slow
def test_training_run_is_deterministic(runs):
    (m0, d0, r0, _), (m1, d1, r1, _) = runs
    strip = ("seconds",)
    assert {k: v for k, v in m0.items() if k not in strip} == {k: v for k, v in m1.items() if k not in strip}
    assert (r0 / "history.csv").read_text() == (r1 / "history.csv").read_text()
    s0, s1 = torch.load(d0 / "model.pt", weights_only=False), torch.load(d1 / "model.pt", weights_only=False)
    for side in ("image_head", "music_head"):
        for k, v in s0[side].items():
            assert torch.equal(v, s1[side][k]), (side, k)
