"""`imem summary` (issue 20): the comparison's headline numbers within 100 columns, each marked lower- or
higher-is-better, read back against the CSV it summarises."""

from __future__ import annotations

import csv
import json

import pytest

from imem.cli import main
from imem.errors import ImemError
from imem.summary import compact


def _table(tmp_path, rows: list[dict]) -> str:
    cols = ["row", "source", "seeds", "sim_mse", "sim_mse_lo", "sim_mse_hi", "image_valence_mse",
            "music_valence_mse", "m2i_sim_r10", "i2m_sim_mrr"]
    path = tmp_path / "comparison.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_rows_values_and_directions_within_100_columns(tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps({"corpus": "embedded (generated) corpus - not real data"}))
    path = _table(tmp_path, [
        {"row": "CDCML (ResNet50 + ResNet18, all losses, eq. 8 sum)", "source": "train@cnn", "seeds": 3,
         "sim_mse": 0.04778, "sim_mse_lo": 0.04343, "sim_mse_hi": 0.05202, "image_valence_mse": 0.011344,
         "music_valence_mse": 0.018937, "m2i_sim_r10": 0.82375, "i2m_sim_mrr": 0.41449},
        {"row": "Emo-CLIM", "source": "method@emo_clim", "seeds": 3},
        {"row": "a" * 40, "source": "x", "seeds": 1, "sim_mse": 0.5}])
    text = compact(path, stats=tmp_path / "stats.json")
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 100
    assert lines[0] == "Test split, embedded (generated) corpus - not real data."
    head = lines[2].split()
    assert head[head.index("MSE") + 1] == "v" and head[head.index("R@10") + 1] == "^" and head[-1] == "^"
    assert lines[3].split() == ["CDCML", "0.0478", "[0.0434", "0.0520]", "0.0113", "0.0189", "0.824", "0.414"]
    assert lines[4].split() == ["Emo-CLIM", "-", "-", "-", "-", "-"]
    assert lines[5].split()[0] == "a" * 25 + "~" and lines[5].split()[1:] == ["0.5000", "-", "-", "-", "-"]
    assert "reports/comparison/comparison.md" in text


def test_the_committed_comparison_fits_and_missing_input_is_one_line(tmp_path, capsys):
    main(["summary"])  # the repository's reports/comparison/comparison.csv, as `make repro` prints it
    out = capsys.readouterr().out.splitlines()
    with open("reports/comparison/comparison.csv") as f:
        n = sum(1 for _ in csv.DictReader(f))
    assert max(len(ln) for ln in out) <= 100 and len(out) == 3 + n + 3
    with pytest.raises(ImemError, match=r"nothing\.csv: no comparison table"):
        compact(tmp_path / "nothing.csv")
    (tmp_path / "bad.csv").write_text("row,sim_mse\nx,1\n")
    with pytest.raises(ImemError, match=r"bad\.csv: not a comparison table \(no column 'image_valence_mse'\)"):
        compact(tmp_path / "bad.csv")
