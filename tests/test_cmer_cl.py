"""CMER-CL (imem.methods.cmer_cl): its formulas against hand-worked values and references, the emotion
sequences against the prepared clips, the retrieval metrics and chance level, and a short training run."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from imem.errors import ImemError
from imem.methods import cmer_cl as cc
from imem.methods.base import CHANCE_ROW, COLUMNS

# --- the formulas -------------------------------------------------------------------------------------------


def test_kl_diag_gaussian_hand_value_and_torch_distributions():
    # 1-d: KL(N(0, 1) || N(1, 4)) = 1/2 (ln 4 + (1 + 1) / 4 - 1) = 0.4431471805599453
    kl = cc.kl_diag_gaussian(
        torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([math.log(4.0)])
    )
    assert kl.item() == pytest.approx(0.5 * (math.log(4.0) + 0.5 - 1.0), abs=1e-7)
    assert kl.item() == pytest.approx(0.4431471805599453, abs=1e-7)
    assert cc.kl_diag_gaussian(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3)).item() == 0.0

    from torch.distributions import Independent, Normal, kl_divergence

    g = torch.Generator().manual_seed(0)
    mu_p, mu_q, lv_p, lv_q = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(4))
    ref = kl_divergence(
        Independent(Normal(mu_p, (0.5 * lv_p).exp()), 1), Independent(Normal(mu_q, (0.5 * lv_q).exp()), 1)
    )
    assert torch.allclose(cc.kl_diag_gaussian(mu_p, lv_p, mu_q, lv_q), ref, atol=1e-12)
    # pairwise: entry (i, j) is KL(p_i || q_j); symmetric adds KL(q_j || p_i)
    d = cc.pairwise_divergence(mu_p, lv_p, mu_q, lv_q, "kl")
    assert d.shape == (5, 5) and d[1, 3].item() == pytest.approx(
        cc.kl_diag_gaussian(mu_p[1], lv_p[1], mu_q[3], lv_q[3]).item()
    )
    s = cc.pairwise_divergence(mu_p, lv_p, mu_q, lv_q, "symmetric")
    assert s[2, 0].item() == pytest.approx(
        d[2, 0].item() + cc.kl_diag_gaussian(mu_q[0], lv_q[0], mu_p[2], lv_p[2]).item()
    )


def _cca_numpy(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    """Textbook CCA: singular values of Sxx^-1/2 Sxy Syy^-1/2 (symmetric inverse square roots by eigh)."""
    n, d = x.shape
    x, y = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = (
        x.T @ x / (n - 1) + eps * np.eye(d),
        y.T @ y / (n - 1) + eps * np.eye(d),
        x.T @ y / (n - 1),
    )

    def inv_sqrt(s):
        w, v = np.linalg.eigh(s)
        return v @ np.diag(w**-0.5) @ v.T

    return -np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), compute_uv=False).sum() / d


def test_cca_loss_hand_value_reference_and_extremes():
    # d = 1: the only canonical correlation is |Pearson r|; x = 1..4, y = (1, 3, 2, 4): r = 4 / 5 by hand
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    assert cc.cca_loss(x, torch.tensor([[1.0], [3.0], [2.0], [4.0]]), eps=0.0).item() == pytest.approx(
        -0.8, abs=1e-6
    )
    assert cc.cca_loss(x, -x, eps=0.0).item() == pytest.approx(-1.0, abs=1e-6)  # |r| = 1, sign-free
    g = torch.Generator().manual_seed(1)
    h1 = torch.randn(50, 3, generator=g, dtype=torch.float64)
    # perfectly correlated (an invertible linear map): every canonical correlation is 1 -> the extreme -1
    a = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, -1.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    assert cc.cca_loss(h1, h1 @ a + 7.0, eps=1e-10).item() == pytest.approx(-1.0, abs=1e-6)
    h2 = torch.randn(50, 3, generator=g, dtype=torch.float64)
    for eps in (1e-10, 1e-3, 0.5):
        ref = _cca_numpy(h1.numpy(), h2.numpy(), eps)
        assert cc.cca_loss(h1, h2, eps=eps).item() == pytest.approx(ref, abs=1e-9)
    assert -1.0 < cc.cca_loss(h1, h2, eps=1e-10).item() < 0.0
    h1.requires_grad_(True)  # finite gradients
    cc.cca_loss(h1, h2, eps=1e-3).backward()
    assert torch.isfinite(h1.grad).all() and h1.grad.abs().sum() > 0


def test_kl_rank_loss_hand_worked_batch():
    d = torch.tensor([[1.0, 3.0, 0.5], [2.0, 1.0, 4.0], [1.5, 2.2, 2.0]])
    # music anchors (rows), alpha = 1: [1+1-3]+ [1+1-.5]+ | [1+1-2]+ [1+1-4]+ | [1+2-1.5]+ [1+2-2.2]+
    #   = 0, 1.5, 0, 0, 1.5, 0.8 -> mean 3.8 / 6
    # emotion anchors (columns): [1+1-2]+ [1+1-1.5]+ | [1+1-3]+ [1+1-2.2]+ | [1+2-.5]+ [1+2-4]+
    #   = 0, 0.5, 0, 0, 2.5, 0 -> mean 3.0 / 6
    assert cc.kl_rank_loss(d, 1.0).item() == pytest.approx(3.8 / 6 + 3.0 / 6, abs=1e-6)
    # matched pairs far closer than every mismatched one by more than the margin: zero loss
    assert cc.kl_rank_loss(torch.tensor([[0.0, 5.0], [5.0, 0.0]]), 1.0).item() == 0.0
    assert cc.composite_loss(torch.tensor(-0.5), torch.tensor(2.0), 0.25).item() == pytest.approx(
        0.25 * -0.5 + 0.75 * 2.0
    )


# --- retrieval and chance -----------------------------------------------------------------------------------


def test_ranks_mrr_and_median_on_a_hand_made_distance_matrix():
    d = np.array([[0.1, 0.5, 0.3], [0.2, 0.4, 0.1], [0.9, 0.8, 0.7]])
    # rows (music -> emotion): own distance 0.1 (rank 1), 0.4 (two smaller: rank 3), 0.7 (rank 1)
    assert cc.ranks_from_distances(d).tolist() == [1, 3, 1]
    # columns (emotion -> music): 0.1 (rank 1), 0.4 (0.5, 0.8 larger: rank 1), 0.7 (0.3, 0.1 smaller: rank 3)
    assert cc.ranks_from_distances(d.T).tolist() == [1, 1, 3]
    row = cc.retrieval_columns(d)
    assert row["m2e_mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3) and row["e2m_mrr"] == pytest.approx(
        (1 + 1 + 1 / 3) / 3
    )
    assert row["m2e_avg_rank"] == pytest.approx(5 / 3) and row["m2e_median_rank"] == 1.0
    assert set(row) <= set(COLUMNS)
    # ties count against the query: a collapsed model ranks every own candidate last
    assert cc.ranks_from_distances(np.ones((4, 4))).tolist() == [4, 4, 4, 4]
    with pytest.raises(ImemError):
        cc.ranks_from_distances(np.zeros((1, 1)))


def test_sequence_distances_are_exact_euclidean_distances():
    # > 25 rows: torch.cdist's default switches to the matmul form there (errors ~4e-13 on this data)
    g = torch.Generator().manual_seed(0)
    true = torch.rand(40, 4, 2, generator=g, dtype=torch.float64)
    pred = true + 1e-3 * torch.rand(40, 4, 2, generator=g, dtype=torch.float64)
    pred[0] = true[0]
    d = cc.sequence_distances(pred, true)
    a, b = pred.flatten(1).numpy(), true.flatten(1).numpy()
    ref = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    assert d.shape == (40, 40) and d.dtype == np.float64
    assert np.abs(d - ref).max() < 1e-15 and d[0, 0] == 0.0
    # a float32 prediction is compared in float64
    assert np.abs(cc.sequence_distances(pred.float(), true) - ref).max() < 1e-6


def _old_ranks(d: np.ndarray) -> np.ndarray:
    """The rank rule before the bootstrap (issue 14), written out: 1 + #{j != i: D_ij <= D_ii}."""
    return 1 + ((d <= d.diagonal()[:, None]) & ~np.eye(len(d), dtype=bool)).sum(axis=1)


def _scored_fixture(n: int = 12, seed: int = 0) -> dict[str, cc.Scored]:
    """A CMER-CL-like divergence matrix with ties (rounded), and a RegMLP-like row from real sequences."""
    rng = np.random.default_rng(seed)
    div = np.round(rng.random((n, n)), 1)  # one decimal: many ties, also with the own candidate
    true = torch.from_numpy(rng.random((n, 4, 2)))
    pred = true + 0.2 * torch.from_numpy(rng.standard_normal((n, 4, 2)))
    true_va = true.mean(1).numpy().astype(np.float32)  # the clip means, float32 as data.va gives them
    return {
        "CMER-CL": cc.Scored(div),
        "RegMLP": cc.Scored(cc.sequence_distances(pred, true), pred.mean(1).numpy(), true_va),
    }


def test_identity_resample_reproduces_the_rows():
    from imem.methods.base import regression_columns

    scored = _scored_fixture()
    n = len(scored["CMER-CL"].dist)
    got = cc.make_rescore(scored)(np.arange(n), np.arange(0))
    assert list(got) == ["CMER-CL", "RegMLP"]
    for label, s in scored.items():
        want = {}
        for short, d in (("m2e", s.dist), ("e2m", s.dist.T)):
            r = _old_ranks(d).astype(float)
            want.update(
                {
                    f"{short}_mrr": np.mean(1 / r),
                    f"{short}_avg_rank": r.mean(),
                    f"{short}_median_rank": np.median(r),
                }
            )
        if s.pred_va is not None:
            want.update(regression_columns({"music": s.pred_va}, {"music": s.true_va}))
        assert list(got[label]) == list(want), label  # same columns, same order
        assert got[label] == pytest.approx(want, abs=1e-9, rel=0), label
        assert got[label] == cc.retrieval_columns(s.dist) | {k: v for k, v in want.items() if "music" in k}
    # the ties are real: some own candidates share their distance with another one
    d = scored["CMER-CL"].dist
    assert ((d == d.diagonal()[:, None]) & ~np.eye(n, dtype=bool)).any()


def test_resample_with_a_duplicated_and_a_dropped_clip_hand_worked():
    d = np.array(
        [
            [0.3, 0.1, 0.5, 0.3],
            [0.2, 0.6, 0.4, 0.9],
            [0.4, 0.2, 0.2, 0.1],
            [0.8, 0.7, 0.6, 0.5],
        ]
    )
    ci = np.array([0, 2, 2, 3])  # clip 1 dropped, clip 2 drawn twice
    # a resample draws only the queries: each drawn query ranks all 4 candidates (the dropped clip 1 too),
    # exactly its own clip relevant. Materialised by hand: m2e rows d[ci[p], :], relevant where q == ci[p]
    dd = np.array(
        [
            [0.3, 0.1, 0.5, 0.3],
            [0.4, 0.2, 0.2, 0.1],
            [0.4, 0.2, 0.2, 0.1],
            [0.8, 0.7, 0.6, 0.5],
        ]
    )
    rel = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    assert np.array_equal(d[ci, :], dd)
    # music -> emotion: m0 own 0.3, e1's 0.1 and the tie 0.3 of e3 count against it: rank 3; both copies of
    # m2: own 0.2, the tie 0.2 of e1 and e3's 0.1: rank 3; m3 own 0.5, nothing <= 0.5: rank 1
    assert cc.ranks_from_distances(dd, rel).tolist() == [3, 3, 3, 1]
    # emotion -> music (columns of d): e0 own 0.3, the dropped m1's 0.2 is closer: rank 2; both copies of e2
    # own 0.2, nothing <= 0.2: rank 1; e3 own 0.5, m0's 0.3 and m2's 0.1 are closer: rank 3
    ee = np.array([[0.3, 0.2, 0.4, 0.8], [0.5, 0.4, 0.2, 0.6], [0.5, 0.4, 0.2, 0.6], [0.3, 0.9, 0.1, 0.5]])
    assert np.array_equal(d.T[ci, :], ee)
    assert cc.ranks_from_distances(ee, rel).tolist() == [2, 1, 1, 3]
    want = {
        "m2e_mrr": (3 / 3 + 1) / 4,
        "m2e_avg_rank": 10 / 4,
        "m2e_median_rank": 3.0,
        "e2m_mrr": (1 / 2 + 1 + 1 + 1 / 3) / 4,
        "e2m_avg_rank": 7 / 4,
        "e2m_median_rank": 1.5,
    }
    assert cc.retrieval_columns(d, ci) == pytest.approx(want, abs=1e-12)
    got = cc.make_rescore({"CMER-CL": cc.Scored(d)})(ci, np.array([5, 5, 1]))  # image draws are ignored
    assert got == {"CMER-CL": pytest.approx(want, abs=1e-12)}
    # the drawn queries' ranks are their plain full-split ranks (the full split: m2e 3, 3, 3, 1;
    # m1 own 0.6, 0.2 and 0.4 closer: rank 3, not drawn)
    assert cc.ranks_from_distances(d).tolist() == [3, 3, 3, 1]
    with pytest.raises(ImemError, match="relevance mask"):
        cc.ranks_from_distances(dd, np.zeros_like(rel))
    with pytest.raises(ImemError, match="square"):
        cc.ranks_from_distances(dd[:3])  # (queries x candidates) needs its relevance mask


def _brute_force_rank(distances: list[float], relevant: list[bool]) -> int:
    """Candidates sorted by distance, an irrelevant one before a relevant one at equal distance (ties count
    against the query): the 1-based position of the first relevant."""
    order = sorted(range(len(distances)), key=lambda j: (distances[j], relevant[j]))
    return next(pos for pos, j in enumerate(order, start=1) if relevant[j])


def test_resample_matches_brute_force_on_materialised_arrays():
    scored = _scored_fixture(n=12, seed=3)
    ci = np.array([7, 0, 3, 3, 3, 9, 11, 0, 5, 2, 10])  # 1, 4, 6, 8 dropped; 0 twice, 3 three times; unsorted
    got = cc.make_rescore(scored)(ci, np.arange(4))
    for label, s in scored.items():
        m, n = len(ci), len(s.dist)
        # each drawn query against the whole pool of n candidates, exactly its own clip relevant
        m2e = [
            _brute_force_rank([float(s.dist[ci[p], q]) for q in range(n)], [q == ci[p] for q in range(n)])
            for p in range(m)
        ]
        e2m = [
            _brute_force_rank([float(s.dist[q, ci[p]]) for q in range(n)], [q == ci[p] for q in range(n)])
            for p in range(m)
        ]
        want = {}
        for short, r in (("m2e", m2e), ("e2m", e2m)):
            want.update(
                {
                    f"{short}_mrr": sum(1 / x for x in r) / m,
                    f"{short}_avg_rank": sum(r) / m,
                    f"{short}_median_rank": float(sorted(r)[m // 2]),
                }
            )  # m odd: the middle one
        if s.pred_va is not None:
            for j, dim in enumerate(("valence", "arousal")):
                err = [float(s.pred_va[i, j]) - float(s.true_va[i, j]) for i in ci]
                want[f"music_{dim}_mse"] = sum(e * e for e in err) / m
                want[f"music_{dim}_mae"] = sum(abs(e) for e in err) / m
        assert set(got[label]) == set(want), label
        assert got[label] == pytest.approx(want, abs=1e-9, rel=0), label
    # the resample changes the numbers (it is not the identity in disguise)
    full = cc.make_rescore(scored)(np.arange(12), np.arange(0))
    assert got["CMER-CL"]["m2e_avg_rank"] != full["CMER-CL"]["m2e_avg_rank"]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_chance_formulas_match_brute_force_over_permutations(n):
    ch = cc.chance_columns(n)
    # every ordering of the n candidates equally likely: the own one's rank over all n! permutations
    ranks = np.array([perm.index(0) + 1 for perm in itertools.permutations(range(n))], dtype=float)
    assert ch["m2e_mrr"] == pytest.approx(np.mean(1.0 / ranks), abs=1e-12)
    assert ch["e2m_avg_rank"] == pytest.approx(ranks.mean(), abs=1e-12)
    # the expected sample median over n independent queries, over all n^n rank combinations
    medians = [np.median(c) for c in itertools.product(range(1, n + 1), repeat=n)]
    assert ch["m2e_median_rank"] == pytest.approx(np.mean(medians), abs=1e-12)
    assert ch["m2e_mrr"] == pytest.approx(sum(1 / k for k in range(1, n + 1)) / n)


# --- emotion sequences --------------------------------------------------------------------------------------


def _dyn(values_v, values_a, t0=15000, step=500):
    from imem.data.clips import DynamicAnnotations

    v, a = np.atleast_2d(values_v).astype(float), np.atleast_2d(values_a).astype(float)
    return DynamicAnnotations(["7"], t0 + step * np.arange(v.shape[1]), v, a)


def test_va_sequences_window_normalisation_and_errors():
    dyn = _dyn(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, np.nan, np.nan],
        [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, np.nan, np.nan],
    )
    maps = {"deam": {"valence": (-1.0, 2.0), "arousal": (-1.0, 4.0)}}
    clips = pd.DataFrame(
        {
            "clip_id": ["7-9"],
            "song_id": ["7"],
            "source": ["deam"],
            "start_s": [16.0],
            "end_s": [18.0],
            "valence_raw": [0.45],
            "arousal_raw": [-0.45],
        }
    )
    seq = cc.va_sequences(clips, dyn, maps, "deam")
    assert seq.shape == (1, 4, 2)  # samples at 16.0, 16.5, 17.0, 17.5 s
    assert np.allclose(seq[0, :, 0], (np.array([0.3, 0.4, 0.5, 0.6]) + 1) / 2)
    assert np.allclose(seq[0, :, 1], (np.array([-0.3, -0.4, -0.5, -0.6]) + 1) / 4)
    late = clips.assign(clip_id="7-10", start_s=18.0, end_s=20.0, valence_raw=0.8, arousal_raw=-0.8)
    with pytest.raises(ImemError, match=r"clip 7-10: no dynamic VA sample at 19000 ms"):
        cc.va_sequences(late, dyn, maps, "deam")
    with pytest.raises(ImemError, match=r"clip 7-9: mean dynamic valence"):
        cc.va_sequences(clips.assign(valence_raw=0.3), dyn, maps, "deam")
    with pytest.raises(ImemError, match=r"'pmemo' clips"):
        cc.va_sequences(clips.assign(source="pmemo"), dyn, maps, "deam")
    # the affine map of the prepare stage is recovered from clips.csv's raw / normalised columns
    frame = pd.DataFrame({"source": "deam", "valence_raw": [-0.5, 0.0, 0.7], "arousal_raw": [0.1, 0.2, 0.9]})
    frame["valence"], frame["arousal"] = (frame["valence_raw"] + 1) / 2, (frame["arousal_raw"] + 1) / 4
    rec = cc.affine_maps([frame])["deam"]
    assert rec["valence"] == pytest.approx((-1.0, 2.0)) and rec["arousal"] == pytest.approx((-1.0, 4.0))


def test_pmemo_sequences_match_the_prepared_clip_means(tmp_path):
    from corpus_fixtures import write_pmemo
    from imem.data.clips import clip_windows
    from imem.data.prepare import normalise

    write_pmemo(tmp_path / "PMEmo", {"3": 30.0, "8": 26.0}, np.random.default_rng(0))
    cfg = {"corpus_root": str(tmp_path), "music_format": "pmemo", "music_dir": "PMEmo"}
    source, dyn = cc.load_dynamic(cfg)
    clips = clip_windows(dyn).assign(source=source)
    clips[["valence_raw", "arousal_raw"]] = clips[["valence", "arousal"]]
    clips[["valence", "arousal"]], _ = normalise(clips[["valence", "arousal"]], clips["source"], {}, "data")
    seq = cc.va_sequences(clips, dyn, cc.affine_maps([clips]), source)
    assert seq.shape == (len(clips), 4, 2) and len(clips) > 5
    assert np.abs(seq.mean(axis=1) - clips[["valence", "arousal"]].to_numpy()).max() < 1e-6  # float32


def test_settings_are_checked():
    base = {"seed": 1, "device": "cpu", "music_encoder": {"type": "resnet", "arch": "resnet18"}}
    assert cc.check_config(base)["lambda_cca"] == cc.DEFAULTS["lambda_cca"]
    for bad, key in (
        ({"lambda_cca": 1.5}, "lambda_cca"),
        ({"margin": -1}, "margin"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"divergence": "js"}, "divergence"),
        ({"music_format": "mp3"}, "music_format"),
        ({"embed_dimm": 3}, "embed_dimm"),
        ({"cca_eps": 0}, "cca_eps"),
        ({"baseline_frame_pool": 0}, "baseline_frame_pool"),
        ({"cpu_threads": -1}, "cpu_threads"),
        ({"dropout": 1.0}, "dropout"),
        # not finite, or a bool (True is an int in Python)
        ({"margin": math.nan}, "margin"),
        ({"margin": math.inf}, "margin"),
        ({"weight_decay": math.nan}, "weight_decay"),
        ({"weight_decay": math.inf}, "weight_decay"),
        ({"lr": math.inf}, "lr"),
        ({"lr": True}, "lr"),
        ({"baseline_lr": True}, "baseline_lr"),
        ({"baseline_lr": math.nan}, "baseline_lr"),
        ({"cca_eps": True}, "cca_eps"),
        ({"cca_eps": math.inf}, "cca_eps"),
        ({"margin": True}, "margin"),
        ({"dropout": False}, "dropout"),
        ({"lambda_cca": True}, "lambda_cca"),
        ({"lambda_cca": math.nan}, "lambda_cca"),
        ({"cpu_threads": True}, "cpu_threads"),
    ):
        with pytest.raises(ImemError, match=rf"methods\.cmer_cl\.{key}") as e:
            cc.check_config({**base, **bad})
        assert "\n" not in str(e.value)
    with pytest.raises(ImemError, match="corpus_root"):
        cc.load_dynamic({**cc.DEFAULTS, "corpus_root": "/nonexistent/corpus"})


# --- the embedded corpus: sequences and a short training run ------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from corpus_fixtures import synth_pipeline

    return synth_pipeline(tmp_path_factory.mktemp("cmer_cl"))


def _methods(tmp, **over):
    return {
        "common": {"seed": 1, "device": "cpu", "image_encoder": "resnet18", "music_encoder": "resnet18"},
        "cmer_cl": {
            "corpus_root": str(tmp / "corpus"),
            "epochs": 6,
            "batch_size": 16,
            "baseline_epochs": 4,
            "baseline_gru_hidden": 8,
            **over,
        },
    }


@pytest.mark.slow
def test_sequences_of_the_prepared_clips_average_to_their_labels(synth):
    from imem.methods.base import load_data

    data = load_data(synth / "prepare", synth / "features", synth / "rep" / "stats.json")
    seqs = cc.emotion_sequences({**cc.DEFAULTS, "corpus_root": str(synth / "corpus")}, data)
    for s, seq in seqs.items():
        clips = data.clips[s]
        assert seq.shape == (len(clips), 4, 2)
        assert np.abs(seq.mean(axis=1) - clips[["valence", "arousal"]].to_numpy()).max() < 2e-6, s
        assert seq.std(axis=1).max() > 0  # real sequences, not the repeated mean
    with pytest.raises(ImemError, match="corpus_root is not the prepared corpus"):
        other = data.clips["train"].assign(valence_raw=data.clips["train"]["valence_raw"] + 0.01)
        source, dyn = cc.load_dynamic({**cc.DEFAULTS, "corpus_root": str(synth / "corpus")})
        cc.va_sequences(other, dyn, cc.affine_maps([data.clips[s] for s in seqs]), source)


@pytest.fixture(scope="module")
def fitted():
    """The MethodResults of ``runs`` (captured around cc.fit_evaluate: run_method only returns metrics)."""
    return []


@pytest.fixture(scope="module")
def runs(synth, fitted):
    from imem.methods.base import run_method
    from imem.params import section

    ev = dict(section("evaluate"), split="test")
    memo, out, threads = {}, [], torch.get_num_threads()
    fit = cc.fit_evaluate

    def capture(cfg, data, ctx):
        fitted.append(fit(cfg, data, ctx))
        return fitted[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cc, "fit_evaluate", capture)  # run_method calls the module's attribute
        for i in range(2):
            m = run_method(
                "cmer_cl",
                _methods(synth),
                ev,
                synth / "prepare",
                synth / "features",
                synth / "rep" / "stats.json",
                synth / f"models{i}",
                synth / f"reports{i}",
                train_encoders=section("train")["encoders"],
                track=False,
                progress=False,
                memo=memo,
            )
            out.append((m, synth / f"models{i}", synth / f"reports{i}"))
            assert torch.get_num_threads() == threads  # cpu_threads is restored after the run
    return out


@pytest.mark.slow
def test_identity_resample_of_a_trained_run_reproduces_its_rows(runs, fitted, synth):
    """The rescore closure of a real run: the identity resample gives the reported rows (chance row excepted),
    and run_method's bootstrap got every column of every model row."""
    from imem import bootstrap

    m, _, report_dir = runs[0]
    result = fitted[0]
    n = len(pd.read_csv(synth / "prepare" / "test" / "clips.csv"))
    got = result.rescore(np.arange(n), np.arange(0))
    want = {k: v for k, v in result.rows.items() if k != CHANCE_ROW}
    assert list(got) == ["CMER-CL", "RegMLP", "RegBiGRU"]
    for label, row in want.items():
        assert list(got[label]) == list(row), label
        assert got[label] == pytest.approx(row, abs=1e-9, rel=0), label
        assert m["rows"][label] == pytest.approx(row, abs=1e-6), label
    reps, n_rep, _ = bootstrap.load(report_dir / "bootstrap.npz")
    assert n_rep >= 1 and set(reps) == set(want)
    for label, row in want.items():
        assert set(reps[label]) == set(row) and all(np.isfinite(v).all() for v in reps[label].values()), label


@pytest.mark.slow
def test_training_run_writes_valid_outputs_and_learns(runs, synth):
    m, model_dir, report_dir = runs[0]
    for f in (
        model_dir / "model.pt",
        report_dir / "metrics.json",
        report_dir / "history.csv",
        report_dir / "results.md",
    ):
        assert f.is_file(), f
    assert list(m["rows"]) == ["CMER-CL", "RegMLP", "RegBiGRU", CHANCE_ROW]
    ret = {f"{d}_{k}" for d in ("m2e", "e2m") for k in ("mrr", "avg_rank", "median_rank")}
    reg = {f"music_{dim}_{k}" for dim in ("valence", "arousal") for k in ("mse", "mae")}
    assert set(m["rows"]["CMER-CL"]) == ret and set(m["rows"][CHANCE_ROW]) == ret
    assert set(m["rows"]["RegMLP"]) == ret | reg and set(m["rows"]["RegBiGRU"]) == ret | reg
    n = len(pd.read_csv(synth / "prepare" / "test" / "clips.csv"))
    assert m["N"] == n and m["rows"][CHANCE_ROW]["m2e_avg_rank"] == pytest.approx((n + 1) / 2)
    hist = pd.read_csv(report_dir / "history.csv")
    assert list(hist["epoch"]) == [1, 2, 3, 4, 5, 6]
    assert {
        "train/total",
        "train/cca",
        "train/kl_rank",
        "val/total",
        "val/cca",
        "val/kl_rank",
        "train/regmlp",
        "val/regmlp",
        "train/regbigru",
        "val/regbigru",
    } <= set(hist)
    assert hist["train/total"].iloc[-1] < hist["train/total"].iloc[0]
    assert hist["train/regmlp"].iloc[3] < hist["train/regmlp"].iloc[0]
    assert hist["train/regbigru"].iloc[3] < hist["train/regbigru"].iloc[0]
    assert hist["train/regbigru"].iloc[4:].isna().all()  # the baselines ran 4 epochs
    assert m["best_epoch"] == int(hist.loc[hist["val/total"].idxmin(), "epoch"])
    assert m["best_epoch_regmlp"] == int(hist.loc[hist["val/regmlp"].idxmin(), "epoch"])
    state = torch.load(model_dir / "model.pt", weights_only=False)
    assert {"music_encoder", "emotion_encoder", "regmlp", "regbigru", "config"} <= set(state)
    assert state["emotion_encoder"]["out.weight"].shape == (
        2 * cc.DEFAULTS["embed_dim"],
        2 * cc.DEFAULTS["gru_hidden"],
    )


@pytest.mark.slow
def test_reported_retrieval_is_that_of_the_saved_models(runs, synth):
    """The test rows of CMER-CL and RegMLP, recomputed here from model.pt (the kept best-val weights), the
    frozen features and the emotion sequences: the checkpoint holds what was scored, on the scored split."""
    from imem.methods.base import SPLITS, load_data, torch_threads

    m, model_dir, _ = runs[0]
    state = torch.load(model_dir / "model.pt", weights_only=False)
    cfg = state["settings"]
    data = load_data(synth / "prepare", synth / "features", synth / "rep" / "stats.json")
    feats = cc._standardise(
        *(data.frozen("music", cfg["music_encoder"], cfg["seed"], s, progress=False).float() for s in SPLITS)
    )[SPLITS.index("test")]
    seqs = torch.from_numpy(cc.emotion_sequences(cfg, data)["test"])
    t = seqs.shape[1]
    music = cc.MusicEncoder(feats.shape[1], cfg["music_hidden"], cfg["embed_dim"], cfg["dropout"])
    emotion = cc.EmotionEncoder(cfg["gru_hidden"], cfg["embed_dim"])
    regmlp = cc.RegMLP(feats.shape[1], cfg["baseline_hidden"], t, cfg["dropout"])
    for model, key in ((music, "music_encoder"), (emotion, "emotion_encoder"), (regmlp, "regmlp")):
        model.load_state_dict(state[key])
        model.eval()
    with torch.no_grad(), torch_threads(cfg["cpu_threads"]):
        div = cc.pairwise_divergence(*music(feats), *emotion(seqs), cfg["divergence"]).double().numpy()
        dist = cc.sequence_distances(regmlp(feats), seqs)
    for label, d in (("CMER-CL", div), ("RegMLP", dist)):
        row = {k: v for k, v in m["rows"][label].items() if k[:4] in ("m2e_", "e2m_")}
        assert row == pytest.approx(cc.retrieval_columns(d), abs=2e-6), label


@pytest.fixture(scope="module")
def train_run(synth):
    from imem.params import section

    return _run_cmer(
        synth,
        _methods(synth, baseline_epochs=8),  # 4 fit RegMLP unreliably here (mean rank 9.5-27 over seeds 1-3)
        dict(section("evaluate"), split="train"),
        synth / "models_train",
        synth / "reports_train",
    )


def _run_cmer(synth, methods: dict, eval_params: dict, models, reports) -> dict:
    """run_method("cmer_cl") on the synth fixture's prepared splits, untracked."""
    from imem.methods.base import run_method
    from imem.params import section

    return run_method(
        "cmer_cl",
        methods,
        eval_params,
        synth / "prepare",
        synth / "features",
        synth / "rep" / "stats.json",
        models,
        reports,
        train_encoders=section("train")["encoders"],
        track=False,
        progress=False,
        memo={},
    )


@pytest.mark.slow
def test_cmer_cl_and_regmlp_fit_the_train_split_beyond_chance(train_run):
    """Scored on the split they were trained on (68 clips): the short run must retrieve far above chance.
    (The fixture's 13 test clips are too few, and 6 epochs too short, to show it there: CMER-CL sat at chance
    there for seeds 1-6.) On the generator of issue 14, over seeds 1-3: CMER-CL's m2e MRR 0.18-0.22 and RegMLP's
    (8 baseline epochs) 0.29-0.59, against chance H_68 / 68 = 0.071; mean ranks 11-14 and 4.5-16 against 34.5.
    With 4 baseline epochs RegMLP's mean rank spread over 9.5-27, too short a run to fit reliably."""
    rows = train_run["rows"]
    chance = rows[CHANCE_ROW]
    assert train_run["N"] == 68 and chance["m2e_mrr"] == pytest.approx(
        cc.chance_columns(68)["m2e_mrr"], abs=1e-6
    )
    for label in ("CMER-CL", "RegMLP"):
        assert rows[label]["m2e_mrr"] > 1.5 * chance["m2e_mrr"], label
        assert rows[label]["m2e_avg_rank"] < 0.75 * chance["m2e_avg_rank"], label


@pytest.mark.slow
def test_training_run_is_deterministic(runs):
    (m0, d0, r0), (m1, d1, r1) = runs
    assert {k: v for k, v in m0.items() if k != "seconds"} == {k: v for k, v in m1.items() if k != "seconds"}
    assert (r0 / "history.csv").read_text() == (r1 / "history.csv").read_text()
    s0, s1 = torch.load(d0 / "model.pt", weights_only=False), torch.load(d1 / "model.pt", weights_only=False)
    for part in ("music_encoder", "emotion_encoder", "regmlp", "regbigru"):
        for k, v in s0[part].items():
            assert torch.equal(v, s1[part][k]), (part, k)


@pytest.mark.slow
def test_a_corpus_without_the_windows_samples_is_refused(synth, tmp_path):
    """A clip whose dynamic samples are gone from the raw annotations: ImemError naming the clip."""
    import shutil

    from imem.params import section

    corpus = tmp_path / "corpus"
    shutil.copytree(synth / "corpus" / "DEAM" / "annotations", corpus / "DEAM" / "annotations")
    clip = pd.read_csv(synth / "prepare" / "train" / "clips.csv", dtype={"song_id": str}).iloc[0]
    for dim in ("valence", "arousal"):
        f = corpus / "DEAM" / "annotations" / f"{dim}.csv"
        df = pd.read_csv(f, dtype={"song_id": str})
        df = df[df["song_id"] != clip["song_id"]]
        df.to_csv(f, index=False)
    with pytest.raises(ImemError, match=rf"clip {clip['clip_id']}: no dynamic VA sample"):
        _run_cmer(
            synth,
            _methods(synth, corpus_root=str(corpus)),
            section("evaluate"),
            tmp_path / "m",
            tmp_path / "r",
        )
