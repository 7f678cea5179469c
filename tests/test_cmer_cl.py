"""CMER-CL (imem.methods.cmer_cl): its formulas against hand computations of the paper's equations (loops,
not the vectorised code), the song segments, the retrieval metrics, bootstrap and chance level, and a short
training run on synthetic songs."""

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


def _kl_eq8(mu1, var1, mu2, var2) -> float:
    """Eq. 8 by hand, one pair of diagonal Gaussians (sigma = the variances), a loop over the d dims."""
    d = len(mu1)
    tr = sum(var1[i] / var2[i] for i in range(d))
    logdet = math.log(math.prod(var2) / math.prod(var1))
    maha = sum((mu2[i] - mu1[i]) ** 2 / var2[i] for i in range(d))
    return 0.5 * (tr - d + logdet + maha)


def test_pairwise_kl_is_eq8_by_hand_and_torch_distributions():
    # 1-d: KL(N(0, 1) || N(1, 4)) = 1/2 (1/4 - 1 + ln 4 + 1/4) = 0.4431471805599453
    one = cc.pairwise_kl(*(torch.tensor([[v]]) for v in (0.0, 0.0, 1.0, math.log(4.0))))
    assert one.item() == pytest.approx(0.4431471805599453, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    mu_a, lv_a = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    mu_b, lv_b = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    d = cc.pairwise_kl(mu_a, lv_a, mu_b, lv_b)
    assert d.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            want = _kl_eq8(mu_a[i].tolist(), lv_a[i].exp().tolist(), mu_b[j].tolist(), lv_b[j].exp().tolist())
            assert d[i, j].item() == pytest.approx(want, abs=1e-10)
    from torch.distributions import Independent, Normal, kl_divergence

    ref = kl_divergence(
        Independent(Normal(mu_a[:, None], (0.5 * lv_a[:, None]).exp()), 1),
        Independent(Normal(mu_b[None], (0.5 * lv_b[None]).exp()), 1),
    )
    assert torch.allclose(d, ref, atol=1e-10)
    assert cc.pairwise_kl(mu_a, lv_a, mu_a, lv_a).diagonal().abs().max() < 1e-10  # KL(p || p) = 0


def _cca_numpy(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    """Textbook CCA: minus the sum of the singular values of Sxx^-1/2 Sxy Syy^-1/2 (eigh inverse roots)."""
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

    return -np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), compute_uv=False).sum()


def test_cca_loss_is_eq3_sum_of_correlations():
    # D = 1: the only canonical correlation is |Pearson r|; x = 1..4, y = (1, 3, 2, 4): r = 4 / 5 by hand
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    assert cc.cca_loss(x, torch.tensor([[1.0], [3.0], [2.0], [4.0]]), eps=0.0).item() == pytest.approx(
        -0.8, abs=1e-6
    )
    assert cc.cca_loss(x, -x, eps=0.0).item() == pytest.approx(-1.0, abs=1e-6)  # |r| = 1, sign-free
    g = torch.Generator().manual_seed(1)
    h1 = torch.randn(50, 3, generator=g, dtype=torch.float64)
    # perfectly correlated (an invertible linear map): all three canonical correlations are 1 -> -3 (a sum)
    a = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, -1.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    assert cc.cca_loss(h1, h1 @ a + 7.0, eps=1e-10).item() == pytest.approx(-3.0, abs=1e-6)
    h2 = torch.randn(50, 3, generator=g, dtype=torch.float64)
    for eps in (1e-10, 1e-3, 0.5):
        assert cc.cca_loss(h1, h2, eps=eps).item() == pytest.approx(
            _cca_numpy(h1.numpy(), h2.numpy(), eps), abs=1e-9
        )
    h1.requires_grad_(True)  # finite gradients
    cc.cca_loss(h1, h2, eps=1e-3).backward()
    assert torch.isfinite(h1.grad).all() and h1.grad.abs().sum() > 0


def test_cca_projections_solve_eq3():
    """E = (h - mean) W: identity covariances (eq. 3's constraints), cross-covariance diag(rho), and
    tr(W_m^T S_me W_e) = the sum of the canonical correlations = -cca_loss."""
    g = torch.Generator().manual_seed(2)
    h1 = torch.randn(80, 4, generator=g, dtype=torch.float64)
    h2 = h1[:, [1, 0, 3, 2]] + 0.7 * torch.randn(80, 4, generator=g, dtype=torch.float64)
    w1, w2, m1, m2 = cc.cca_projections(h1, h2, eps=0.0)
    e1, e2 = (h1 - m1) @ w1, (h2 - m2) @ w2
    cov = lambda a, b: a.T @ b / (len(a) - 1)  # noqa: E731
    assert torch.allclose(cov(e1, e1), torch.eye(4, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(cov(e2, e2), torch.eye(4, dtype=torch.float64), atol=1e-8)
    c = cov(e1, e2)
    assert torch.allclose(c, torch.diag(c.diagonal()), atol=1e-8)
    assert c.diagonal().sum().item() == pytest.approx(-cc.cca_loss(h1, h2, eps=0.0).item(), abs=1e-8)


def test_cca_on_more_dimensions_than_songs_is_degenerate():
    """Why cca_dim is not the paper's 1,024: on 115 songs (one train batch), two *independent* random views
    of 1,024 dims reach the maximal sum of canonical correlations (every correlation ~1: n - 1 = 114 of
    them), so the loss says nothing about the data; at 32 dims independent views stay far below the maximum."""
    g = torch.Generator().manual_seed(0)
    big = [torch.randn(115, 1024, generator=g, dtype=torch.float64) for _ in range(2)]
    rho_big = -cc.cca_loss(*big, eps=1e-3).item()
    assert rho_big > 0.95 * 114
    small = [torch.randn(115, 32, generator=g, dtype=torch.float64) for _ in range(2)]
    rho_small = -cc.cca_loss(*small, eps=1e-3).item()
    assert rho_small < 0.5 * 32


def _eq6_by_hand(d_me: list[list[float]], d_em: list[list[float]], alpha: float, hinge: str) -> float:
    """KL(G) = sum_n r(N^m_n, N^e_n), r of eq. 6 with loops; ``triplet`` moves alpha to the other side."""
    n, total = len(d_me), 0.0
    for a in range(n):
        for b in range(n):
            if b == a:
                continue
            for d in (d_me, d_em):  # music anchors D(N^m_a, .), emotion anchors D(N^e_a, .)
                v = d[a][a] - alpha - d[a][b] if hinge == "eq6" else alpha + d[a][a] - d[a][b]
                total += max(0.0, v)
    return total


def test_kl_rank_loss_is_eq6_by_hand():
    d_me = [[1.0, 3.0, 0.5], [2.0, 1.0, 4.0], [1.5, 0.2, 2.0]]
    d_em = [[0.5, 2.5, 0.1], [3.0, 2.0, 0.4], [1.0, 1.0, 1.0]]
    # eq. 6 as printed, alpha = 1: music anchors [1-1-3]+ [1-1-.5]+ | [1-1-2]+ [1-1-4]+ | [2-1-1.5]+ [2-1-.2]+
    #   = 0 + 0 + 0 + 0 + 0 + 0.8; emotion anchors [.5-1-2.5]+ [.5-1-.1]+ | [2-1-3]+ [2-1-.4]+ | [1-1-1]+ x2
    #   = 0 + 0 + 0 + 0.6 + 0 + 0 -> 1.4
    got = cc.kl_rank_loss(torch.tensor(d_me), torch.tensor(d_em), 1.0, "eq6").item()
    assert got == pytest.approx(1.4, abs=1e-6) and got == pytest.approx(
        _eq6_by_hand(d_me, d_em, 1.0, "eq6"), abs=1e-6
    )
    # the triplet reading: [alpha + D_pos - D_neg]+
    got = cc.kl_rank_loss(torch.tensor(d_me), torch.tensor(d_em), 1.0, "triplet").item()
    assert got == pytest.approx(_eq6_by_hand(d_me, d_em, 1.0, "triplet"), abs=1e-6)
    # sums, not means: a random 6 x 6 batch against the loops
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 6)) * 3, rng.random((6, 6)) * 3
    for hinge in ("eq6", "triplet"):
        for alpha in (0.0, 0.4, 1.0):
            want = _eq6_by_hand(a.tolist(), b.tolist(), alpha, hinge)
            assert cc.kl_rank_loss(torch.tensor(a), torch.tensor(b), alpha, hinge).item() == pytest.approx(
                want, abs=1e-9
            )
    with pytest.raises(ImemError, match="hinge"):
        cc.kl_rank_loss(torch.tensor(a), torch.tensor(b), 1.0, "other")
    assert cc.composite_loss(torch.tensor(-0.5), torch.tensor(2.0), 0.25).item() == pytest.approx(
        0.25 * -0.5 + 0.75 * 2.0
    )


def test_retrieval_score_is_section_3_4_by_hand():
    e_m = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    e_e = torch.tensor([[2.0, 4.0, 7.0], [3.0, 2.0, 1.0]])

    def pearson(x, y):
        mx, my = sum(x) / len(x), sum(y) / len(y)
        num = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
        return num / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))

    p = cc.pearson_matrix(e_m, e_e)
    for i in range(2):
        for j in range(2):
            assert p[i, j].item() == pytest.approx(pearson(e_m[i].tolist(), e_e[j].tolist()), abs=1e-12)
    kl = torch.tensor([[0.5, 2.0], [1.0, 0.1]], dtype=torch.float64)
    s = cc.retrieval_score(p, kl, 0.8)
    assert s[0, 1].item() == pytest.approx(0.8 * pearson([1, 2, 3], [3, 2, 1]) - 0.2 * 2.0, abs=1e-12)
    assert s[0, 1].item() == pytest.approx(0.8 * -1.0 - 0.4, abs=1e-12)


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


def test_abs_error_distances_by_hand():
    pred = torch.tensor([[0.5, 0.2], [0.1, 0.9]])
    true = torch.tensor([[0.4, 0.4], [0.0, 1.0], [0.5, 0.2]], dtype=torch.float64)
    d = cc.abs_error_distances(pred, true)
    assert d.dtype == np.float64 and d.shape == (2, 3)
    assert d[0].tolist() == pytest.approx([0.1 + 0.2, 0.5 + 0.8, 0.0], abs=1e-7)
    assert d[1].tolist() == pytest.approx([0.3 + 0.5, 0.1 + 0.1, 0.4 + 0.7], abs=1e-7)


def _scored_fixture(n: int = 12, seed: int = 0) -> dict[str, cc.Scored]:
    """A CMER-CL-like pair of distance matrices with ties (rounded, m2e and e2m different), and a
    RegMLP-like row from VA predictions."""
    rng = np.random.default_rng(seed)
    true = rng.random((n, 2))
    pred = true + 0.2 * rng.standard_normal((n, 2))
    return {
        "CMER-CL": cc.Scored(np.round(rng.random((n, n)), 1), np.round(rng.random((n, n)), 1)),
        "RegMLP": cc.Scored(
            cc.abs_error_distances(torch.from_numpy(pred), torch.from_numpy(true)),
            np.round(rng.random((n, n)), 1),
            pred,
            true.astype(np.float32),
        ),
    }


def _brute_force_rank(distances: list[float], relevant: list[bool]) -> int:
    """Candidates sorted by distance, an irrelevant one before a relevant one at equal distance (ties count
    against the query): the 1-based position of the first relevant."""
    order = sorted(range(len(distances)), key=lambda j: (distances[j], relevant[j]))
    return next(pos for pos, j in enumerate(order, start=1) if relevant[j])


def test_song_resample_matches_brute_force():
    """Clips -> songs: each song's first clip stands for it, so a song drawn k times (all its clips k times)
    is k queries; each query ranks the split's whole pool of songs, its own the relevant one."""
    n = 12
    scored = _scored_fixture(n=n, seed=3)
    # 12 songs of 1-3 clips, interleaved in the clip table
    song_of = np.array([0, 1, 0, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 11, 2, 9])
    first = np.full(len(song_of), -1)
    for s in range(n):
        first[np.flatnonzero(song_of == s)[0]] = s
    rescore = cc.make_rescore(scored, first)
    drawn = [7, 0, 3, 3, 3, 9, 11, 0, 5, 2, 10]  # songs 1, 4, 6, 8 dropped; 0 twice, 3 three times
    ci = np.concatenate([np.flatnonzero(song_of == s) for s in drawn])
    got = rescore(ci, np.arange(4))
    m = len(drawn)
    for label, s in scored.items():
        e2m_d = s.dist.T if s.dist_e2m is None else s.dist_e2m
        want = {}
        for short, d in (("m2e", s.dist), ("e2m", e2m_d)):
            r = [
                _brute_force_rank([float(d[q, c]) for c in range(n)], [c == q for c in range(n)])
                for q in drawn
            ]
            want.update(
                {
                    f"{short}_mrr": sum(1 / x for x in r) / m,
                    f"{short}_avg_rank": sum(r) / m,
                    f"{short}_median_rank": float(sorted(r)[m // 2]),
                }
            )
        # the M2E baselines' song-mean VA errors are run notes (song_va_errors), not resampled row columns
        assert set(got[label]) == set(want) and set(want) <= set(COLUMNS), label
        assert got[label] == pytest.approx(want, abs=1e-9, rel=0), label
    # the identity resample (every clip once) is the reported rows: every song once
    full = rescore(np.arange(len(song_of)), np.arange(0))
    assert full == cc.score_rows(scored, np.arange(n))
    assert full["CMER-CL"] == pytest.approx(
        cc.retrieval_columns(scored["CMER-CL"].dist, scored["CMER-CL"].dist_e2m)
    )
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


# --- song segments ----------------------------------------------------------------------------------------


def _dyn(values_v, values_a, t0=15000, step=500):
    from imem.data.clips import DynamicAnnotations

    v, a = np.atleast_2d(values_v).astype(float), np.atleast_2d(values_a).astype(float)
    return DynamicAnnotations(["7"], t0 + step * np.arange(v.shape[1]), v, a)


def test_song_segments_by_hand():
    # song 7: 2-Hz samples from 15 s; a 2-s segment 16-18 s for a short check (T = 4)
    dyn = _dyn(
        [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]],
        [[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9, -1.0]],
    )
    maps = {"deam": {"valence": (-1.0, 2.0), "arousal": (-1.0, 4.0)}}
    clips = pd.DataFrame(
        {
            "clip_id": ["7-9", "7-10"],
            "song_id": ["7", "7"],
            "source": ["deam", "deam"],
            "start_s": [16.0, 18.0],
            "end_s": [18.0, 20.0],
            "valence_raw": [0.45, 0.85],
            "arousal_raw": [-0.45, -0.85],
        }
    )
    songs = cc.song_segments(clips, dyn, maps, "deam", 16.0, 18.0)
    assert songs.song_ids == ["7"] and songs.seq.shape == (1, 4, 2)
    assert np.allclose(songs.seq[0, :, 0], (np.array([0.3, 0.4, 0.5, 0.6]) + 1) / 2)
    assert np.allclose(songs.seq[0, :, 1], (np.array([-0.3, -0.4, -0.5, -0.6]) + 1) / 4)
    assert [m.tolist() for m in songs.clips] == [[0]]  # only the clip inside the segment
    assert songs.song_of_clip.tolist() == [0, -1]
    assert np.allclose(songs.va[0], songs.seq[0].mean(0))
    whole = cc.song_segments(clips, dyn, maps, "deam", 15.0, 20.0)
    assert whole.seq.shape == (1, 10, 2) and [m.tolist() for m in whole.clips] == [[0, 1]]
    with pytest.raises(ImemError, match=r"song 7: the deam annotations lack"):
        cc.song_segments(clips, dyn, maps, "deam", 15.0, 25.0)
    with pytest.raises(ImemError, match=r"song 7: no clip lies inside"):
        cc.song_segments(clips, dyn, maps, "deam", 15.0, 16.5)
    with pytest.raises(ImemError, match=r"clip 7-9: mean dynamic valence"):  # the clips.csv check
        cc.song_segments(clips.assign(valence_raw=0.3), dyn, maps, "deam", 16.0, 18.0)
    # the affine map of the prepare stage is recovered from clips.csv's raw / normalised columns
    frame = pd.DataFrame({"source": "deam", "valence_raw": [-0.5, 0.0, 0.7], "arousal_raw": [0.1, 0.2, 0.9]})
    frame["valence"], frame["arousal"] = (frame["valence_raw"] + 1) / 2, (frame["arousal_raw"] + 1) / 4
    rec = cc.affine_maps([frame])["deam"]
    assert rec["valence"] == pytest.approx((-1.0, 2.0)) and rec["arousal"] == pytest.approx((-1.0, 4.0))


def test_settings_are_checked():
    base = {"seed": 1, "device": "cpu", "music_encoder": {"type": "resnet", "arch": "resnet18"}}
    assert cc.check_config(base)["lambda_cca"] == 0.8 and cc.DEFAULTS["margin"] == 1.0
    for bad, key in (
        ({"lambda_cca": 1.5}, "lambda_cca"),
        ({"margin": -1}, "margin"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"hinge": "js"}, "hinge"),
        ({"music_format": "mp3"}, "music_format"),
        ({"embed_dimm": 3}, "embed_dimm"),
        ({"cca_eps": 0}, "cca_eps"),
        ({"cca_dim": 0}, "cca_dim"),
        ({"music_layers": []}, "music_layers"),
        ({"emotion_layers": [512, 0]}, "emotion_layers"),
        ({"regmlp_e2m_layers": 32}, "regmlp_e2m_layers"),
        ({"regbigru_m2e_hidden": 0}, "regbigru_m2e_hidden"),
        ({"segment_start_s": -1.0}, "segment_start_s"),
        ({"segment_end_s": 15.0}, "segment_end_s"),
        ({"cpu_threads": -1}, "cpu_threads"),
        ({"dropout": 1.0}, "dropout"),
        ({"margin": math.nan}, "margin"),
        ({"weight_decay": math.inf}, "weight_decay"),
        ({"lr": True}, "lr"),
        ({"baseline_lr": math.nan}, "baseline_lr"),
        ({"lambda_cca": True}, "lambda_cca"),
        ({"cpu_threads": True}, "cpu_threads"),
    ):
        with pytest.raises(ImemError, match=rf"methods\.cmer_cl\.{key}") as e:
            cc.check_config({**base, **bad})
        assert "\n" not in str(e.value)
    with pytest.raises(ImemError, match="corpus_root"):
        cc.load_dynamic({**cc.DEFAULTS, "corpus_root": "/nonexistent/corpus"})


def test_params_yaml_agrees_with_the_defaults():
    from pathlib import Path

    import yaml

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    assert params["methods"]["cmer_cl"] == cc.DEFAULTS


# --- a short training run on synthetic songs ------------------------------------------------------------


def _synthetic(sizes=(("train", 24), ("val", 8), ("test", 10)), width=16, t=12, seed=0):
    """Songs whose VA sequence is a noisy linear function of their (3-clip) music features."""
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((width, 2)) * 0.1
    songs, inputs = {}, {}
    for s, n in sizes:
        clips = torch.from_numpy(rng.standard_normal((n, 3, width)).astype(np.float32))
        va = 0.5 + clips.mean(1).numpy() @ proj
        seq = (va[:, None] + 0.02 * rng.standard_normal((n, t, 2))).astype(np.float32)
        soc = np.full(3 * n, -1)
        soc[::3] = np.arange(n)
        songs[s] = cc.Songs(
            [str(k) for k in range(n)], seq, [np.arange(3 * k, 3 * k + 3) for k in range(n)], soc
        )
        inputs[s] = {
            "mean": clips.mean(1),
            "clips": clips,
            "lengths": torch.full((n,), 3),
            "seq": torch.from_numpy(seq),
        }
    return songs, inputs


def _small_cfg(**over):
    return cc.check_config(
        {
            "seed": 1,
            "device": "cpu",
            "music_encoder": {"type": "resnet"},
            "epochs": 30,
            "baseline_epochs": 30,
            "embed_dim": 8,
            "cca_dim": 4,
            "music_layers": [16, 16],
            "emotion_layers": [16, 16],
            "gru_hidden": 8,
            "dropout": 0.1,
            "regmlp_m2e_layers": [8],
            "regbigru_m2e_layers": [8],
            "regbigru_m2e_hidden": 8,
            "regbigru_e2m_layers": [8],
            "regbigru_e2m_hidden": 8,
            **over,
        }
    )


def _train(split="test", **over):
    from imem.methods.base import RunContext

    songs, inputs = _synthetic()
    ctx = RunContext(split=split, relevance_threshold=0.5, ndcg_k=10, progress=False, log=lambda m, s: None)
    with cc.torch_threads(1):
        return cc._train_evaluate(_small_cfg(**over), ctx, torch.device("cpu"), songs, inputs), songs


def test_short_training_run_rows_history_and_determinism():
    res, songs = _train()
    assert set(res.rows) == {"CMER-CL", "RegMLP", "RegBiGRU", CHANCE_ROW}
    for label, row in res.rows.items():
        assert set(row) <= set(COLUMNS) and all(math.isfinite(v) for v in row.values()), label
    # song-mean VA is another unit than the comparison's per-clip music columns: notes, not row columns
    assert not any(c.startswith("music_") for row in res.rows.values() for c in row)
    want = {f"{b}_song_{d}_{m}" for b in ("regmlp", "regbigru") for d in ("valence", "arousal") for m in ("mse", "mae")}
    assert want <= set(res.notes) and all(0 <= res.notes[k] < 1 for k in want)
    s = cc.Scored(np.zeros((2, 2)), None, np.array([[0.1, 0.2], [0.4, 0.4]]), np.array([[0.3, 0.2], [0.4, 0.0]]))
    hand = cc.song_va_errors({"RegMLP": s})
    assert hand["regmlp_song_valence_mse"] == pytest.approx((0.2**2 + 0) / 2)
    assert hand["regmlp_song_arousal_mae"] == pytest.approx((0 + 0.4) / 2)
    assert res.notes["N"] == 10 and res.notes["units"] == "songs" and res.notes["seq_len"] == 12
    assert {"train/total", "val/kl_rank", "val/rank", "train/regmlp_m2e", "val/regbigru_e2m"} <= set(res.history[0])
    # CMER-CL's weights are those of the epoch with the lowest val retrieval rank (a fraction of the val songs)
    val_rank = [h["val/rank"] for h in res.history]
    assert res.notes["best_epoch"] == 1 + int(np.argmin(val_rank))
    assert all(0 < r <= 1 for r in val_rank) and len(set(val_rank)) > 1
    # the rows are the identity resample of the bootstrap's rescore (clips -> songs)
    assert res.rescore(np.arange(30), np.arange(0)) == {k: v for k, v in res.rows.items() if k != CHANCE_ROW}
    again, _ = _train()
    assert again.rows == res.rows and again.history == res.history
    assert set(res.state) >= {
        "music_encoder",
        "emotion_encoder",
        "cca_projections",
        "regmlp_m2e",
        "regbigru_e2m",
    }


def test_short_training_run_fits_the_train_split_beyond_chance():
    """Scored on the 24 songs it was trained on (a learnable synthetic relation): CMER-CL and the M2E
    regression must retrieve well above chance (mean rank 12.5)."""
    res, _ = _train(split="train", hinge="triplet", epochs=60, baseline_epochs=60)
    chance = res.rows[CHANCE_ROW]
    for label in ("CMER-CL", "RegMLP"):
        assert res.rows[label]["m2e_avg_rank"] < 0.75 * chance["m2e_avg_rank"], (label, res.rows[label])


# --- the whole method through run_method, on a small embedded corpus -----------------------------------------

@pytest.mark.slow
def test_run_method_on_an_embedded_corpus_writes_song_level_rows(tmp_path):
    """stages/method.py's path end to end: songs of the prepared splits, their 15-45 s dynamic annotations
    read from the raw corpus (T = 60), frozen clip features, rows, bootstrap intervals and the checkpoint."""
    import json

    from corpus_fixtures import synth_pipeline
    from imem.methods.base import run_method
    from imem.params import section

    tmp = synth_pipeline(tmp_path, n_songs=12)  # 12 + 1 long songs, split 60/20/20: >= 2 songs per split
    stats = json.loads((tmp / "rep" / "stats.json").read_text())
    n_test = stats["counts"]["test"]["songs"]
    assert n_test >= 2
    methods = {"common": {"seed": 1, "device": "cpu", "image_encoder": "resnet18", "music_encoder": "resnet18",
                          "n_seeds": 2},
               "cmer_cl": {"corpus_root": str(tmp / "corpus"), "epochs": 4, "baseline_epochs": 4,
                           "embed_dim": 16, "cca_dim": 2, "music_layers": [16], "emotion_layers": [16],
                           "gru_hidden": 8, "regbigru_m2e_hidden": 8, "regbigru_e2m_hidden": 8}}
    ev = dict(section("evaluate"), bootstrap={"n": 40, "seed": 2026, "level": 0.95})
    m = run_method("cmer_cl", methods, ev, tmp / "prepare", tmp / "features", tmp / "rep" / "stats.json",
                   tmp / "models", tmp / "reports", train_encoders=section("train")["encoders"], track=False,
                   progress=False, memo={})
    assert (tmp / "models" / "model.pt").is_file() and (tmp / "reports" / "metrics.json").is_file()
    assert set(m["rows"]) == {"CMER-CL", "RegMLP", "RegBiGRU", CHANCE_ROW}
    assert m["units"] == "songs" and m["N"] == n_test and m["seq_len"] == 60
    for label in ("CMER-CL", "RegMLP", "RegBiGRU"):
        row = m["rows"][label]
        for d in ("m2e", "e2m"):
            assert 1 <= row[f"{d}_avg_rank"] <= n_test and 0 < row[f"{d}_mrr"] <= 1, (label, row)
        ci = m["rows_ci"][label]
        assert ci["lo"]["m2e_avg_rank"] <= ci["hi"]["m2e_avg_rank"] and set(ci["lo"]) >= {"m2e_mrr", "e2m_mrr"}
    # chance: the expected rank of the single relevant song among N is (N + 1) / 2
    assert m["rows"][CHANCE_ROW]["m2e_avg_rank"] == pytest.approx((n_test + 1) / 2)


def test_encoders_keep_the_songs_apart_at_init():
    """torch's default Linear init shrinks the between-song spread ~3.5x per softplus layer, so after the five
    layers every song got nearly the same f̂ in eval mode (the committed model did not train: best epoch 1);
    He init (variance_preserving_) and the TF GRU init keep it. Spread = mean over dims of the std over songs
    of f̂, for 115 z-scored inputs, relative to the mean |f̂|."""
    torch.manual_seed(0)
    x, seq = torch.randn(115, 512), torch.randn(115, 60, 2)

    def spread(body_in, body):
        with torch.no_grad():
            f = body(body_in)
        return float(f.std(0).mean() / f.abs().mean())

    layers = [256, 512, 512, 1024, 1024]
    default_m = spread(x, cc.softplus_stack(512, layers).eval())
    with torch.no_grad():
        g_default = cc.bigru_last(torch.nn.GRU(2, 64, batch_first=True, bidirectional=True), seq)
    default_e = spread(g_default, cc.softplus_stack(128, [512, 512, 512, 1024, 1024]).eval())
    music = cc.MusicEncoder(512, layers, 0.0, 32, 1024).eval()
    emotion = cc.EmotionEncoder(64, [512, 512, 512, 1024, 1024], 0.0, 32, 1024).eval()
    with torch.no_grad():
        g = cc.bigru_last(emotion.gru, seq)
    ours_m, ours_e = spread(x, music.body), spread(g, emotion.body)
    # measured: music 3e-3 -> 0.25, emotion 1.6e-4 -> 0.03
    assert default_m < 0.01 and default_e < 1e-3, (default_m, default_e)
    assert ours_m > 20 * default_m and ours_e > 50 * default_e, (ours_m, default_m, ours_e, default_e)
    # the TF init: orthogonal recurrent kernels per gate, zero biases
    w = emotion.gru.weight_hh_l0.detach()[:64]
    assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    assert float(emotion.gru.bias_ih_l0.abs().max()) == 0.0
