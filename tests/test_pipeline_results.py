"""What `make repro` produced on the embedded corpus (CI runs `make repro` before the tests, and checks
that the regenerated reports equal the committed ones)."""

import json
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "reports" / "train" / "cnn" / "metrics.json"
TARGETS = ("sim_mse", "image_valence_mse", "image_arousal_mse", "music_valence_mse", "music_arousal_mse")


def test_cnn_beats_the_mean_predictor_on_the_embedded_corpus():
    if not REPORT.is_file():
        pytest.fail(f"{REPORT} is missing: run `make repro` (it is committed with the pipeline)")
    r = json.loads(REPORT.read_text())
    assert r["finished"]
    for split in ("val", "test"):
        print(split, {t: f"{r[f'{split}/{t}']:.4f} vs mean {r[f'{split}/{t}_mean_predictor']:.4f} "
                         f"(margin {r[f'{split}/{t}_margin']:+.4f})" for t in TARGETS})
    # the validation split is the one training selects on; the test split is reported by `evaluate`
    for t in TARGETS:
        assert r[f"val/{t}"] < r[f"val/{t}_mean_predictor"], t
        assert r[f"val/{t}_margin"] == pytest.approx(r[f"val/{t}_mean_predictor"] - r[f"val/{t}"], abs=2e-6)


EVAL = Path(__file__).resolve().parents[1] / "reports" / "evaluate"


def test_evaluate_on_the_embedded_corpus_beats_the_references():
    """The cnn variant's test-split results that `evaluate` wrote: better than the mean predictor on
    similarity and image VA, and retrieval clearly above the exact chance level in both directions."""
    path = EVAL / "cnn" / "metrics.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make repro` (it is committed with the pipeline)")
    m = json.loads(path.read_text())
    best, mean, rnd = m["best"], m["mean_predictor"], m["random_ranking"]
    for t in ("sim_mse", "image_valence_mse", "image_arousal_mse", "music_arousal_mse"):
        print(f"{t}: {best[t]:.4f} vs mean predictor {mean[t]:.4f}")
        assert best[t] < mean[t], t
    for d in ("m2i", "i2m"):
        for s in ("sim", "emb"):
            print(f"{d} by {s}: nDCG@10 {best[f'{d}_{s}_ndcg10']:.3f} (chance {rnd[f'{d}_ndcg10']:.3f}), "
                  f"rho {best[f'{d}_{s}_spearman']:.3f}, MRR {best[f'{d}_{s}_mrr']:.3f} (chance {rnd[f'{d}_mrr']:.3f})")
            assert best[f"{d}_{s}_ndcg10"] > rnd[f"{d}_ndcg10"] + 0.03
            assert best[f"{d}_{s}_spearman"] > 0.1
    # training moved the space: the untrained model ranks worse than the trained one by embedding distance
    assert best["m2i_emb_spearman"] > m["untrained"]["m2i_emb_spearman"] + 0.1
    summary = (EVAL / "summary" / "regression.md").read_text()
    assert "mean predictor" in summary and "embedded (generated) corpus" in summary
