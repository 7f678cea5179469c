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
