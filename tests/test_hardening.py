"""Issue 16: no code runs from a model file, no silent data loss, bad files refused in one line
(docs/reliability.md lists every fault tried and the test that checks it)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from corpus_fixtures import prepared_pipeline, write_small_corpus
from imem.checkpoints import plain, read_checkpoint, safe_load, save
from imem.data.common import wav_header_seconds
from imem.data.prepare import prepare
from imem.errors import ImemError
from imem.io import atomic_dir, atomic_path
from imem.params import section


def _run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "imem.cli", *args], cwd=cwd, capture_output=True, text=True)


# --- item 1: code execution from a checkpoint -------------------------------------------------------------

class _Payload:
    """Unpickling this calls os.system: what a hostile .pt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {"kind": "matching", "variant": "cnn", "x": _Payload(marker)}}, evil)
    # the file really is hostile: a full unpickle runs the payload
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ImemError, match=r"evil\.pt: refused: this checkpoint holds Python objects beyond tensors"):
        read_checkpoint(evil)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    r = _run_cli(["predict", str(tmp_path / "x.png"), "--model", str(evil), "--quiet"], tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "refused" in r.stderr and "evil.pt" in r.stderr
    assert not marker.exists()  # the payload never ran


def test_every_checkpoint_imem_writes_loads_with_weights_only(tmp_path):
    """best.pt and last.pt of a training run, read back with weights_only=True (what read_checkpoint does);
    a resume reads last.pt the same way (tests/test_training.py::test_resume_...)."""
    from imem.params import section as sec
    from imem.training import train_variant, variant_config

    prepared_pipeline(tmp_path)
    raw = {"train": {"common": {"epochs": 1, "batch_size": 16, "cache_batch_size": 16},
                     "encoders": {"r18": {"type": "resnet", "arch": "resnet18", "pretrained": None}},
                     "variants": {"cnn": {"kind": "matching", "image_encoder": "r18", "music_encoder": "r18",
                                          "image_head": "pool", "music_head": "pool"}}}}
    cfg = variant_config(sec("train", raw), "cnn")
    cfg["seed"] = np.int64(1)  # a NumPy scalar in a config (e.g. from a sampler) is saved as a plain int
    train_variant(cfg, tmp_path / "prepare", tmp_path / "features", tmp_path / "m", tmp_path / "r",
                  track=False, progress=False)
    for name in ("best.pt", "last.pt"):
        ck = torch.load(tmp_path / "m" / name, weights_only=True)
        assert type(ck["config"]["seed"]) is int and ck["config"]["variant"] == "cnn"
    assert set(read_checkpoint(tmp_path / "m" / "last.pt")) >= {"optimizer", "scheduler", "torch_rng"}


def test_plain_keeps_tensors_and_state_dict_metadata():
    sd = torch.nn.BatchNorm1d(3).state_dict()
    out = plain({"a": np.float32(0.5), "b": (np.int64(2), Path("/x")), "c": {3, 1}, "sd": sd, "t": torch.ones(2)})
    assert out["a"] == 0.5 and type(out["a"]) is float and out["b"] == (2, "/x") and out["c"] == [1, 3]
    assert out["sd"]._metadata == sd._metadata and torch.equal(out["t"], torch.ones(2))


def test_incomplete_or_foreign_checkpoints_are_one_line(tmp_path):
    save({"model": {}, "config": {"kind": "matching"}}, tmp_path / "a.pt")
    with pytest.raises(ImemError, match=r"a\.pt: the checkpoint's config lacks 'variant'"):
        read_checkpoint(tmp_path / "a.pt")
    save({"weights": {}}, tmp_path / "b.pt")
    with pytest.raises(ImemError, match=r"b\.pt: not an imem checkpoint \(expected a dict with 'model', 'config'\)"):
        read_checkpoint(tmp_path / "b.pt")
    (tmp_path / "c.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ImemError, match=r"c\.pt: not a readable checkpoint"):
        safe_load(tmp_path / "c.pt")
    # a config that names its kind and variant but not its encoders: one line from the loader, not KeyError
    from imem.inference import load_model

    save({"model": {}, "config": {"kind": "matching", "variant": "cnn"}}, tmp_path / "d.pt")
    with pytest.raises(ImemError, match=r"d\.pt: the checkpoint's config lacks '"):
        load_model(tmp_path / "d.pt")
    # evaluate's path (best.pt / last.pt of a model directory): every train.common key and the kind's encoders
    from imem.evaluation import load_checkpoints
    from imem.params import section

    cfg = {"kind": "matching", "variant": "cnn", **section("train", {})["common"], "image_encoder": {"type": "resnet"}}
    del cfg["loss_weights"]
    for name in ("best", "last"):
        save({"model": {}, "config": cfg, "epoch": 1}, tmp_path / "m" / f"{name}.pt")
    with pytest.raises(ImemError, match=r"best\.pt: the checkpoint's config lacks 'loss_weights', 'music_encoder': "
                                        r"not a complete imem checkpoint$"):
        load_checkpoints(tmp_path / "m")


# --- item 2: truncated media -------------------------------------------------------------------------------

def _params(root, **over):
    p = section("prepare", {"prepare": {"corpus_root": str(root)}})
    p["pairs"].update(top=2, bottom=2, random=3, keep_fraction=0.5)
    p["split"] = {"train": 0.6, "val": 0.2, "test": 0.2}
    p.update(over)
    return p


@pytest.fixture()
def corpus(tmp_path):
    write_small_corpus(tmp_path / "corpus")
    return tmp_path / "corpus"


def test_wav_header_duration_is_read_from_the_data_chunk(corpus):
    wav = corpus / "DEAM" / "MEMD_audio" / "10.wav"
    assert wav_header_seconds(wav) == pytest.approx(45.0, abs=1e-6)
    assert wav_header_seconds(next((corpus / "IAPS").rglob("*.jpg"))) is None


def test_a_truncated_or_header_only_wav_is_an_error_naming_the_file(corpus):
    full = prepare(_params(corpus), progress=False)
    assert (pd.concat(full.clips.values())["song_id"] == "10").sum() == 13  # what a silent drop would lose
    wav = corpus / "DEAM" / "MEMD_audio" / "10.wav"
    data = wav.read_bytes()
    wav.write_bytes(data[:len(data) // 3])  # `truncate`: the header still declares 45 s
    with pytest.raises(ImemError, match=r"10\.wav: song 10: the file holds 1[45]\.\d\d s of the 45\.00 s its header "
                                        r"declares \(truncated\); replace the file, or set prepare\.short_audio: drop"):
        prepare(_params(corpus), progress=False)
    wav.write_bytes(data[:44])  # header only
    with pytest.raises(ImemError, match=r"10\.wav: song 10: the file holds 0\.00 s of the 45\.00 s"):
        prepare(_params(corpus), progress=False)


def test_audio_shorter_than_its_annotations_is_an_error_or_a_listed_drop(corpus, capsys):
    import soundfile as sf

    wav = corpus / "DEAM" / "MEMD_audio" / "17.wav"
    y, sr = sf.read(wav)
    sf.write(wav, y[: 30 * sr], sr)  # a whole, valid file of 30 s; the annotations run to 44.5 s
    with pytest.raises(ImemError, match=r"17\.wav: song 17: the audio ends at 30\.00 s, before the last annotated "
                                        r"sample at 44\.50 s"):
        prepare(_params(corpus), progress=False)
    ref = corpus / "DEAM" / "MEMD_audio" / "10.wav"
    ref.write_bytes(ref.read_bytes()[:1000])
    out = prepare(_params(corpus, short_audio="drop"), progress=False)
    err = capsys.readouterr().err
    assert "warning: prepare.short_audio = drop: 2 songs left out, with all their clips:" in err
    assert "  10: " in err and "  17: " in err
    songs = set(pd.concat(out.clips.values())["song_id"])
    assert "10" not in songs and "17" not in songs and len(songs) == 5
    with pytest.raises(ImemError, match=r"prepare\.short_audio = 'skip' is not one of: error, drop"):
        prepare(_params(corpus, short_audio="skip"), progress=False)


def test_a_truncated_jpeg_is_refused_by_prepare(corpus):
    jpg = next((corpus / "NAPS").rglob("*.jpg"))
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImemError, match=rf"unreadable image file .*{jpg.name}: "):
        prepare(_params(corpus), progress=False)


def test_a_nan_label_prints_as_nan(corpus):
    f = corpus / "DEAM" / "annotations" / "static_annotations_averaged_songs_1_2000.csv"
    lines = f.read_text().splitlines()
    parts = lines[1].split(", ")
    parts[1] = "nan"
    lines[1] = ", ".join(parts)
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ImemError, match=r"valence_mean = nan is missing or not a number") as exc:
        prepare(_params(corpus), progress=False)
    assert "np.float64" not in str(exc.value)


# --- item 8: smaller ones ----------------------------------------------------------------------------------

def test_an_empty_pair_list_is_one_line(tmp_path):
    (tmp_path / "v.txt").write_text("")
    r = _run_cli(["audit", f"val={tmp_path / 'v.txt'}"], tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'v.txt'}: no pairs in the "
                                                                   "file (expected lines '<clip_id> <image_id> <score>')"]


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """A writer killed inside atomic_dir/atomic_path leaves its temporary; the next write of the same
    target removes it, and leaves a live writer's temporary and other targets' alone."""
    code = ("import os, sys; sys.path.insert(0, {root!r}); from imem.io import atomic_dir, atomic_path\n"
            "with atomic_dir({d!r}) as t:\n    (t / 'big').write_bytes(b'x' * 1000)\n    os.kill(os.getpid(), 9)\n")
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code.format(root=root, d=str(tmp_path / "features"))])
    assert r.returncode == -9
    left = list(tmp_path.glob(".features.*.tmp"))
    assert len(left) == 1 and (left[0] / "big").is_file()
    live = tmp_path / f".features.{os.getpid()}.abc.tmp"
    live.mkdir()
    other = tmp_path / ".features.csv.1.abc.tmp"
    other.write_text("")
    with atomic_dir(tmp_path / "features") as t:
        (t / "ok").write_text("1")
    assert not left[0].exists() and live.exists() and other.exists()
    assert (tmp_path / "features" / "ok").read_text() == "1"
    (tmp_path / ".m.json.abcdefgh.tmp").write_text("")  # an older writer's name (no pid): stale
    with atomic_path(tmp_path / "m.json") as t:
        t.write_text("{}")
    assert sorted(p.name for p in tmp_path.glob(".m.json.*")) == []


def test_a_killed_tune_workers_scratch_directory_is_removed_by_the_next_worker(tmp_path, monkeypatch):
    """A tune trial trains in <tmp>/imem-tune-<pid>-*; a worker killed mid-trial left it (with the trial's
    checkpoints) in /tmp for good. The next scratch directory of the same prefix removes the dead pids' ones,
    and leaves a live process's and other prefixes' alone."""
    import tempfile

    from imem.io import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = ("import os, sys; sys.path.insert(0, {root!r}); from imem.io import scratch_dir\n"
            "with scratch_dir('imem-tune-') as t:\n    (t / 'last.pt').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), 9)\n")
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code.format(root=root)], env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == -9
    (left,) = tmp_path.glob("imem-tune-*")
    assert (left / "last.pt").is_file()
    live = tmp_path / f"imem-tune-{os.getppid()}-abc"
    other = tmp_path / "imem-tune-rank-1-abc"
    live.mkdir()
    other.mkdir()
    with scratch_dir("imem-tune-") as t:
        assert t.name.startswith(f"imem-tune-{os.getpid()}-") and t.is_dir()
        assert not left.exists() and live.exists() and other.exists()
    assert not t.exists()


def test_params_yaml_documents_short_audio():
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert params["prepare"]["short_audio"] == section("prepare", {})["short_audio"] == "error"


# --- item 3: tune workers racing on a new storage -----------------------------------------------------------

_OPEN = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from imem.params import section
from imem.tuning import open_study
go = Path({go!r})
while not go.exists():
    time.sleep(0.002)
open_study({url!r}, section("tune", {{}}), "race")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_workers_starting_together_on_a_new_storage_all_open_the_study(tmp_path, kind):
    """Issue 16 item 3: four workers released at the same instant onto a storage that does not exist yet
    (Optuna creates its tables on first use), three rounds: every worker opens the same study."""
    import optuna

    root = str(Path(__file__).resolve().parents[1])
    for rnd in range(3):
        db = tmp_path / f"r{rnd}" / ("optuna.db" if kind == "sqlite" else "optuna.journal")
        db.parent.mkdir()
        url = f"sqlite:///{db}" if kind == "sqlite" else str(db)
        go = tmp_path / f"go{rnd}"
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN.format(root=root, go=str(go), url=url)],
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        time.sleep(6)  # every worker has imported torch and optuna and waits for the go
        go.write_text("")
        errs = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        assert all(rc == 0 for rc, _ in errs), [e.strip().splitlines()[-1] for rc, e in errs if rc]
        if kind == "sqlite":
            assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["race"]


# --- item 7: every params value has a type and a range ------------------------------------------------------

@pytest.mark.parametrize(("raw", "line"), [
    ({"prepare": {"pairs": {"top": "ten"}}}, "params: prepare.pairs.top = 'ten': must be an integer >= 0"),
    ({"prepare": {"pairs": {"keep_fraction": -0.5}}}, "params: prepare.pairs.keep_fraction = -0.5: must be a number in (0, 1]"),
    ({"prepare": {"pairs": {"chunk_size": 0}}}, "params: prepare.pairs.chunk_size = 0: must be an integer >= 1"),
    ({"prepare": {"clip_seconds": -2}}, "params: prepare.clip_seconds = -2: must be a number > 0"),
    ({"train": {"common": {"lr": -0.001}}}, "params: train.common.lr = -0.001: must be a number > 0"),
    ({"train": {"common": {"epochs": "ten"}}}, "params: train.common.epochs = 'ten': must be an integer >= 1"),
    ({"train": {"common": {"epochs": -1}}}, "params: train.common.epochs = -1: must be an integer >= 1"),
    ({"train": {"common": {"batch_size": 0}}}, "params: train.common.batch_size = 0: must be an integer >= 2"),
    ({"train": {"common": {"dropout": 2}}}, "params: train.common.dropout = 2: must be a number in [0, 1)"),
    ({"train": {"common": {"fc_only": "yes"}}}, "params: train.common.fc_only = 'yes': must be true or false"),
    ({"train": {"common": {"decoder_hidden": [256, 0]}}}, "params: train.common.decoder_hidden.1 = 0: must be an integer >= 1"),
    ({"evaluate": {"bootstrap": {"level": 1.5}}}, "params: evaluate.bootstrap.level = 1.5: must be a number in (0, 1)"),
    ({"features": {"image_size": 22.5}}, "params: features.image_size = 22.5: must be an integer >= 8"),
    ({"tune": {"space": {"lr": {"low": 0}}}}, "params: tune.space.lr.low = 0: must be a number > 0"),
    ({"tune": {"space": {"margin": {"low": 0}}}},
     "params: tune.space.margin: low = 0: a log-scale range needs low > 0 (or log: false)"),
    ({"tune": {"space": {"lr": {"low": 0.1, "high": 0.01}}}}, "params: tune.space.lr: low = 0.1 is above high = 0.01"),
])
def test_a_bad_value_is_one_line_naming_the_key_and_the_range(raw, line):
    name = next(iter(raw))
    with pytest.raises(ImemError) as exc:
        section(name, raw)
    assert str(exc.value) == line


def test_numbers_take_yaml_exponents_and_variants_are_checked_where_they_were_set():
    from imem.training import variant_config

    # a linear margin range may start at 0 (only a log scale needs low > 0)
    assert section("tune", {"tune": {"space": {"margin": {"low": 0, "log": False}}}})["space"]["margin"]["low"] == 0

    assert section("train", yaml.safe_load("train: {common: {lr: 1e-3}}"))["common"]["lr"] == 0.001
    raw = {"train": {"encoders": {"r": {"type": "resnet", "arch": "resnet18"}},
                     "variants": {"v": {"kind": "matching", "image_encoder": "r", "music_encoder": "r", "epochs": 0}}}}
    with pytest.raises(ImemError, match=r"^params: train\.variants\.v\.epochs = 0: must be an integer >= 1$"):
        variant_config(section("train", raw), "v")


def test_the_cli_refuses_a_bad_value_in_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"common": {"epochs": -1}}}))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "stages" / "train.py"), "cnn"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "error: params: train.common.epochs = -1: must be an integer >= 1"
    assert not (tmp_path / "reports").exists() and not (tmp_path / "models").exists()


def test_the_repository_params_yaml_passes_the_schema():
    path = Path(__file__).resolve().parents[1] / "params.yaml"
    for name in ("synth", "prepare", "features", "train", "evaluate", "visualize", "methods", "tune"):
        section(name, path=path)


def test_an_unreadable_non_wav_audio_file_prints_only_the_error_line(tmp_path):
    """Issue 16 item 8: librosa's audioread fallback printed FutureWarning/UserWarning lines before imem's
    `error:` line. prepare's duration check and the feature store's reader are silent but for that line."""
    junk = tmp_path / "song.m4a"
    junk.write_bytes(b"\x00\x00\x00\x18ftypM4A " + b"not audio" * 100)
    code = ("import sys; sys.path.insert(0, {root!r})\n"
            "from imem.errors import ImemError\nfrom imem.features.store import read_audio\n"
            "from imem.data.common import audio_duration\nfrom pathlib import Path\n"
            "for f in (read_audio, audio_duration):\n"
            "    try:\n        f(Path({p!r}))\n    except ImemError as e:\n        print('error:', e, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-W", "default", "-c", code.format(root=str(Path(__file__).resolve().parents[1]),
                                                                           p=str(junk))],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stderr
    assert all(line.startswith(f"error: unreadable audio file {junk}") for line in lines), r.stderr
