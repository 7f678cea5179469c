import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from corpus_fixtures import write_small_corpus
from imem.data.prepare import normalise, prepare, split_ids, write_outputs
from imem.errors import ImemError
from imem.params import section


def _params(root, **over):
    p = section("prepare", {"prepare": {"corpus_root": str(root)}})
    p["pairs"]["top"], p["pairs"]["bottom"], p["pairs"]["random"] = 2, 2, 3
    p["pairs"]["keep_fraction"] = 0.5
    p["split"] = {"train": 0.6, "val": 0.2, "test": 0.2}
    p.update(over)
    return p


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    info = write_small_corpus(root)
    return root, info


def test_normalise_by_minimum_and_range():
    df = pd.DataFrame({"valence": [2.0, 4.0, 6.0, 0.5, 0.7], "arousal": [1.0, 3.0, 2.0, 0.0, 1.0]})
    by = pd.Series(["a", "a", "a", "b", "b"])
    out, k = normalise(df, by, {"a": (1, 9), "b": (0, 1)}, "data")
    np.testing.assert_allclose(out["valence"][:3], [0, 0.5, 1])
    assert k["a"]["valence"] == {"min": 2.0, "range": 4.0}
    out, k = normalise(df, by, {"a": (1, 9), "b": (0, 1)}, "scale")
    np.testing.assert_allclose(out["arousal"], [0, 0.25, 0.125, 0, 1])
    with pytest.raises(ImemError, match="source b has a constant valence"):
        normalise(df.iloc[3:4], by.iloc[3:4], {}, "data")


def test_split_is_disjoint_complete_and_seeded():
    ids = np.array([str(i) for i in range(200)])
    a = split_ids(ids, {"train": 0.8, "val": 0.05, "test": 0.15}, 1, "songs")
    assert set(a) == set(ids)
    counts = pd.Series(a).value_counts().to_dict()
    assert counts == {"train": 160, "val": 10, "test": 30}
    assert a == split_ids(ids, {"train": 0.8, "val": 0.05, "test": 0.15}, 1, "songs")
    assert a != split_ids(ids, {"train": 0.8, "val": 0.05, "test": 0.15}, 2, "songs")
    with pytest.raises(ImemError, match="split 'val' is empty: 5 songs"):
        split_ids(ids[:5], {"train": 0.9, "val": 0.05, "test": 0.05}, 1, "songs")


def test_prepare_end_to_end(corpus, tmp_path):
    root, info = corpus
    prep = prepare(_params(root), progress=False)
    clips = pd.concat(prep.clips.values())
    images = pd.concat(prep.images.values())
    # 6 songs x 13 clips + the 61-s song annotated to 60.5 s: windows 9..30, last dropped -> 9..29
    assert len(clips) == 6 * 13 + 21
    assert len(images) == 20 + 16 + 12
    # music split by song, images by image: nothing in two splits
    assert clips.groupby("song_id")["split"].nunique().max() == 1
    assert not images["image_id"].duplicated().any()
    for s, p in prep.pairs.items():
        assert set(p["clip_id"]) <= set(prep.clips[s]["clip_id"])
        assert set(p["image_id"]) <= set(prep.images[s]["image_id"])
        assert len(p) == round(0.5 * len(prep.clips[s]) * 7)
    # normalised per source into [0, 1], touching both ends
    for df in (clips, images):
        for _src, g in df.groupby("source"):
            assert g["valence"].min() == 0 and g["valence"].max() == 1
    iaps = images[images["source"] == "iaps"]
    k = prep.stats["normalization"]["iaps"]["valence"]
    np.testing.assert_allclose(iaps["valence"], (iaps["valence_raw"] - k["min"]) / k["range"])
    # sigma: exact mean over all clip x image pairs
    cv, iv = clips[["valence", "arousal"]].to_numpy(), images[["valence", "arousal"]].to_numpy()
    brute = np.sqrt(((cv[:, None, :] - iv[None, :, :]) ** 2).sum(-1)).mean()
    assert prep.stats["sigma"] == pytest.approx(brute, rel=1e-6)
    assert prep.audit["clean"] is True and prep.stats["leakage_clean"] is True


def test_outputs_and_stats(corpus, tmp_path):
    root, _ = corpus
    prep = prepare(_params(root), progress=False)
    write_outputs(prep, tmp_path / "out", tmp_path / "rep")
    for s in ("train", "val", "test"):
        for t in ("clips", "images", "pairs"):
            assert (tmp_path / "out" / s / f"{t}.csv").is_file()
    stats = json.loads((tmp_path / "rep" / "stats.json").read_text())
    assert stats["counts"]["train"]["clips"] == len(prep.clips["train"])
    assert set(stats["normalization"]) == {"mode", "deam", "iaps", "naps", "emotic"}
    assert "Verdict: no leakage" in (tmp_path / "rep" / "audit.md").read_text()
    # deterministic bytes: a second run writes identical files
    write_outputs(prepare(_params(root), progress=False), tmp_path / "out2", tmp_path / "rep2")
    for f in (tmp_path / "out").rglob("*.csv"):
        assert f.read_bytes() == (tmp_path / "out2" / f.relative_to(tmp_path / "out")).read_bytes()


def test_import_imemnet_lists(corpus, tmp_path):
    root, info = corpus
    prep0 = prepare(_params(root), progress=False)
    lists = root / "IMEMNet"
    lists.mkdir(exist_ok=True)
    for s in ("train", "val", "test"):
        p = prep0.pairs[s]
        (lists / f"{s}_matching.txt").write_text(
            "".join(f"{c} {i} {sc}\n" for c, i, sc in zip(p["clip_id"], p["image_id"], p["score"], strict=True)))
    p = _params(root)
    p["pairs"]["source"] = "imemnet"
    prep = prepare(p, progress=False)
    for s in ("train", "val", "test"):
        assert len(prep.pairs[s]) == len(prep0.pairs[s])
        np.testing.assert_allclose(prep.pairs[s]["score"], prep0.pairs[s]["score"])
    # an id the corpus does not have
    with (lists / "val_matching.txt").open("a") as fh:
        fh.write("10-99 7033 0.5\n")
    with pytest.raises(ImemError, match=r"val_matching.txt: clip id '10-99' matches no clip of the corpus"):
        prepare(p, progress=False)
    for f in lists.iterdir():
        f.unlink()
    lists.rmdir()


def _run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "imem.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_bad_input_one_line_nonzero_nothing_written(corpus, tmp_path):
    root, _ = corpus
    params = {"prepare": {"corpus_root": str(root), "pairs": {"topp": 3}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = _run_cli(["prepare", "--quiet"], tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: params: unknown key 'prepare.pairs.topp' (known: bottom, chunk_size, " \
                               "imemnet_dir, keep_fraction, random, source, top)"
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "reports").exists()

    params = {"prepare": {"corpus_root": str(tmp_path / "nowhere")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = _run_cli(["prepare", "--quiet"], tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "corpus directory not found" in r.stderr


def test_cli_audit(tmp_path):
    (tmp_path / "val_matching.txt").write_text("1-9 a 0.5\n2-9 b 0.5\n")
    (tmp_path / "test_matching.txt").write_text("1-10 c 0.5\n")
    r = _run_cli(["audit", str(tmp_path / "val_matching.txt"), str(tmp_path / "test_matching.txt"),
                  "--json", str(tmp_path / "a.json")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "a.json").read_text())["shared"]["val~test"]["songs"] == 1
    assert "| val~test | 1 | 0 | 0 | 0 |" in r.stdout


def test_a_failing_stage_leaves_previous_outputs_untouched(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    write_outputs(prepare(_params(root), progress=False), out, tmp_path / "rep")
    before = {p: p.read_bytes() for p in out.rglob("*.csv")}
    bad = _params(root)
    bad["normalization"] = "zscore"
    with pytest.raises(ImemError, match="prepare.normalization = 'zscore'"):
        write_outputs(prepare(bad, progress=False), out, tmp_path / "rep")
    assert {p: p.read_bytes() for p in out.rglob("*.csv")} == before
    assert not list(tmp_path.glob(".*tmp"))


def test_stage_script_is_thin():
    src = (Path(__file__).resolve().parents[1] / "stages" / "prepare.py").read_text()
    assert len(src.splitlines()) < 20


def test_split_takes_a_seeded_permutation_of_the_sorted_unique_ids_in_train_val_test_order():
    """The documented rule, from its parts: the unique ids sorted as text, numpy's permutation for the seed, the
    first round((1 - val - test) n) to train, the next round(val n) to val, the rest to test; repeated ids
    count once and the input order does not matter."""
    ids = np.array([f"s{i}" for i in (5, 3, 12, 0, 7, 1, 9, 2, 11, 4, 8, 10, 6)] + ["s3", "s7"])
    got = split_ids(ids, {"train": 0.6, "val": 0.25, "test": 0.15}, 4, "songs")
    uniq = sorted(set(ids))  # 13 ids: val round(3.25) = 3, test round(1.95) = 2, train 8
    perm = np.random.default_rng(4).permutation(13)
    want = {uniq[j]: "train" for j in perm[:8]} | {uniq[j]: "val" for j in perm[8:11]} | {uniq[j]: "test" for j in perm[11:]}
    assert got == want
    assert split_ids(ids[::-1], {"train": 0.6, "val": 0.25, "test": 0.15}, 4, "songs") == want


def test_split_fractions_are_checked():
    ids = np.array([str(i) for i in range(40)])
    for bad in ({"train": 0.8, "val": 0.3, "test": -0.1}, {"train": 0.8, "val": 0.1, "test": 0.2},
                {"train": 0.8, "val": 0.1, "test": 0.0999}):
        with pytest.raises(ImemError, match="must be >= 0 and sum to 1"):
            split_ids(ids, bad, 0, "songs")
    with pytest.raises(ImemError, match="unknown key 'prepare.split.tset'"):
        split_ids(ids, {"train": 0.8, "val": 0.1, "tset": 0.1}, 0, "songs")
    with pytest.raises(ImemError, match="split 'test' is empty: 40 songs"):  # a missing fraction is 0
        split_ids(ids, {"train": 0.9, "val": 0.1}, 0, "songs")
    # within the 1e-6 tolerance of 1, and a split of exactly one id
    counts = pd.Series(split_ids(ids, {"train": 0.95, "val": 0.025, "test": 0.0250000001}, 0, "songs")).value_counts()
    assert counts.to_dict() == {"train": 38, "val": 1, "test": 1}
