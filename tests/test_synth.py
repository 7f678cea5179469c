"""The embedded-corpus generator: layout, file formats, determinism, IMEMNet scale, learnable cues."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import scipy.io
import soundfile as sf
from PIL import Image
from scipy.stats import spearmanr

from imem.data import synth
from imem.data.clips import DynamicAnnotations, clip_windows
from imem.data.synth import (
    IMAGE_EMOTIONS,
    IMAGE_TO_MUSIC_EMOTION,
    MUSIC_EMOTIONS,
    MatStruct,
    image_emotion,
    synthesize,
    write_mat5,
)
from imem.errors import ImemError

TINY = dict(seed=11, n_songs=4, n_long_songs=1, long_song_seconds=[24, 31], n_iaps=12, n_naps=12,
            n_emotic=12, image_width=64, image_height=48)
CUES = dict(seed=7, n_songs=12, n_long_songs=0, sample_rate=22050, n_iaps=40, n_naps=40, n_emotic=40,
            image_width=96, image_height=72)
STATIC = "DEAM/annotations/static_annotations_averaged_songs_1_2000.csv"
STATIC_LONG = "DEAM/annotations/static_annotations_averaged_songs_2000_2058.csv"


# ---------------------------------------------------------------------------------------------- helpers


def read_dynamic(root: Path) -> DynamicAnnotations:
    val = pd.read_csv(root / "DEAM/annotations/valence.csv")
    aro = pd.read_csv(root / "DEAM/annotations/arousal.csv")
    assert list(val.columns) == list(aro.columns)
    times = np.array([int(re.fullmatch(r"sample_(\d+)ms", c).group(1)) for c in val.columns[1:]])
    return DynamicAnnotations(val["song_id"].astype(str).tolist(), times,
                              val.iloc[:, 1:].to_numpy(float), aro.iloc[:, 1:].to_numpy(float))


def read_static(root: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(root / STATIC, skipinitialspace=True),
                      pd.read_csv(root / STATIC_LONG, skipinitialspace=True)], ignore_index=True)


def read_iaps(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "IAPS/AllSubjects_1-20.txt", sep="\t", skiprows=7, dtype={"IAPS": str})


def iaps_image(root: Path, image_id: str) -> Path:
    found = [p for p in (root / "IAPS/images").glob(f"{image_id}.*") if p.stem == image_id]
    assert len(found) == 1, image_id
    return found[0]


def load_emotic(root: Path) -> dict:
    return scipy.io.loadmat(root / "EMOTIC/Annotations.mat", squeeze_me=True, struct_as_record=False)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "corpus"
    return out, synthesize(TINY, out, progress=False)


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "corpus"
    t0 = time.perf_counter()
    summary = synthesize(TINY, out, labels_only=True, progress=False)
    elapsed = time.perf_counter() - t0
    print(f"label-only generation: {elapsed:.2f} s")
    return out, summary, elapsed


@pytest.fixture(scope="module")
def cues(tmp_path_factory):
    out = tmp_path_factory.mktemp("cues") / "corpus"
    synthesize(CUES, out, progress=False)
    return out


# ---------------------------------------------------------------------------------------------- layout


def test_layout_and_summary(tiny):
    root, summary = tiny
    for rel in ["README.txt", STATIC, STATIC_LONG, "DEAM/annotations/valence.csv", "DEAM/annotations/arousal.csv",
                "DEAM/captions.csv", "DEAM/emotions.csv", "IAPS/AllSubjects_1-20.txt", "IAPS/emotions.csv",
                "NAPS/NAPS_ratings.csv", "NAPS/emotions.csv", "EMOTIC/Annotations.mat", "EMOTIC/emotions.csv"]:
        assert (root / rel).is_file(), rel
    assert summary == {"labels_only": False, "songs": 5, "long_songs": 1, "clips": summary["clips"],
                       "iaps": 12, "naps": 12, "emotic": 12, "images": 36}
    assert len(list((root / "DEAM/MEMD_audio").glob("*.wav"))) == 5
    readme = (root / "README.txt").read_text()
    assert "generated embedded corpus, not real data" in readme and "seed: 11" in readme
    # Nothing but the corpus: no temporary leftovers next to it.
    assert [p.name for p in root.parent.iterdir()] == ["corpus"]


def test_deam_annotations(tiny):
    root, _ = tiny
    for rel in (STATIC, STATIC_LONG):
        assert (root / rel).read_text().splitlines()[0] == "song_id, valence_mean, valence_std, arousal_mean, arousal_std"
    short = pd.read_csv(root / STATIC, skipinitialspace=True)
    long_ = pd.read_csv(root / STATIC_LONG, skipinitialspace=True)
    assert list(short.columns) == ["song_id", "valence_mean", "valence_std", "arousal_mean", "arousal_std"]
    assert len(short) == 4 and len(long_) == 1
    assert short.song_id.between(2, 2000).all() and long_.song_id.between(2001, 2058).all()
    assert short.song_id.is_monotonic_increasing
    static = read_static(root)
    for col in ("valence_mean", "arousal_mean"):
        assert static[col].between(1, 9).all()
    for col in ("valence_std", "arousal_std"):
        assert static[col].between(0.8, 2.0).all()
    assert re.fullmatch(r"\d+, \d\.\d\d, \d\.\d\d, \d\.\d\d, \d\.\d\d", (root / STATIC).read_text().splitlines()[1])

    dyn = read_dynamic(root)
    assert dyn.song_ids == [str(s) for s in static.song_id]  # one row per song, sorted by id
    assert dyn.times_ms[0] == 15000 and (np.diff(dyn.times_ms) == 500).all()
    for values in (dyn.valence, dyn.arousal):
        finite = np.isfinite(values)
        assert (np.abs(values[finite]) <= 1).all()
        n_valid = finite.sum(axis=1)
        assert (finite == (np.arange(values.shape[1])[None, :] < n_valid[:, None])).all()  # empty cells only at the end
        assert (dyn.times_ms[n_valid[:4] - 1] == 44500).all()  # 45-s songs: 15000 .. 44500 ms
        long_seconds = sf.info(root / f"DEAM/MEMD_audio/{dyn.song_ids[4]}.wav").duration
        assert dyn.times_ms[n_valid[4] - 1] == 1000 * long_seconds - 500  # annotated to the end
        assert n_valid.max() == values.shape[1]  # the header stops at the latest sample
    row = (root / "DEAM/annotations/valence.csv").read_text().splitlines()[1].split(",")
    assert all(re.fullmatch(r"-?\d\.\d{4}", x) for x in row[1:61]) and set(row[61:]) <= {""}


def test_audio_and_clips(tiny):
    root, summary = tiny
    dyn = read_dynamic(root)
    durations = []
    for sid in dyn.song_ids:
        info = sf.info(root / f"DEAM/MEMD_audio/{sid}.wav")
        assert (info.samplerate, info.channels, info.subtype, info.format) == (44100, 1, "PCM_16", "WAV")
        durations.append(info.frames / info.samplerate)
    durations = np.array(durations)
    assert (durations[:4] == 45).all() and 24 <= durations[4] <= 31
    clips = clip_windows(dyn, durations)
    assert len(clips) == summary["clips"] == len(clip_windows(dyn))
    for sid in dyn.song_ids[:4]:
        assert clips.loc[clips.song_id == sid, "k"].tolist() == list(range(9, 22))
    n_long = (clips.song_id == dyn.song_ids[4]).sum()
    assert n_long == int(durations[4]) // 2 - 9 >= 3
    captions = pd.read_csv(root / "DEAM/captions.csv")
    emotions = pd.read_csv(root / "DEAM/emotions.csv")
    assert captions.clip_id.tolist() == clips.clip_id.tolist() == emotions.clip_id.tolist()
    assert set(emotions.emotion) <= set(MUSIC_EMOTIONS)
    assert captions.caption.str.contains(r"\d+ (?:bpm|beats per minute)").all()
    assert captions.caption.nunique() > len(captions) // 2
    # Audible everywhere (features never NaN), never clipped.
    for sid in dyn.song_ids:
        y, sr = sf.read(root / f"DEAM/MEMD_audio/{sid}.wav")
        rms = np.sqrt((y[: len(y) // sr * sr].reshape(-1, sr) ** 2).mean(axis=1))
        assert rms.min() > 1e-4 and np.abs(y).max() < 1.0


def test_iaps_file(tiny):
    root, _ = tiny
    lines = (root / "IAPS/AllSubjects_1-20.txt").read_text().splitlines()
    assert lines[7] == "desc\tIAPS\tvalmn\tvalsd\taromn\tarosd\tdom1mn\tdom1sd\tdom2mn\tdom2sd\tset"
    assert "not real data" in "\n".join(lines[:7]).lower()
    df = read_iaps(root)
    assert len(df) == 12 and df.IAPS.is_unique
    assert df.IAPS.str.fullmatch(r"\d{4}(\.\d)?").all()
    assert df.IAPS.astype(float).between(1000, 10000).all() and df.IAPS.astype(float).is_monotonic_increasing
    for col in ("valmn", "aromn", "dom1mn", "dom2mn"):
        assert df[col].between(1, 9).all()
    assert df["set"].between(1, 20).all() and df["desc"].str.fullmatch(r"[A-Za-z]+").all()
    for image_id in df.IAPS:
        path = iaps_image(root, image_id)
        assert path.suffix in (".jpg", ".JPG")
        with Image.open(path) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (64, 48), "RGB")
    emo = pd.read_csv(root / "IAPS/emotions.csv", dtype={"image_id": str})
    assert emo.image_id.tolist() == df.IAPS.tolist() and set(emo.emotion) <= set(IMAGE_EMOTIONS)


def test_naps_file(tiny):
    root, _ = tiny
    df = pd.read_csv(root / "NAPS/NAPS_ratings.csv")
    assert list(df.columns) == ["ID", "Category", "Nr", "V/H", "Description", "Valence_M", "Valence_SD",
                                "Arousal_M", "Arousal_SD", "Approach-avoidance_M", "Approach-avoidance_SD"]
    assert len(df) == 12 and df.ID.is_unique and df.ID.is_monotonic_increasing
    parts = df.ID.str.extract(r"^(Animals|Faces|Landscapes|Objects|People)_(\d{3})_([hv])$")
    assert parts.notna().all().all()
    assert (parts[0] == df.Category).all() and (parts[1].astype(int) == df.Nr).all()
    assert (parts[2].str.upper() == df["V/H"]).all()
    for col in ("Valence_M", "Arousal_M", "Approach-avoidance_M"):
        assert df[col].between(1, 9).all()
    for image_id, vh in zip(df.ID, df["V/H"], strict=True):
        with Image.open(root / f"NAPS/images/{image_id}.jpg") as im:
            assert im.size == ((48, 64) if vh == "V" else (64, 48))
    emo = pd.read_csv(root / "NAPS/emotions.csv")
    assert emo.image_id.tolist() == df.ID.tolist()


def test_emotic_file(tiny):
    root, _ = tiny
    mat = load_emotic(root)
    records = {s: np.atleast_1d(mat[s]) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in records.items()} == {"train": 10, "val": 1, "test": 1}
    patterns = {"mscoco": r"COCO_(train|val)2014_\d{12}\.jpg", "ade20k": r"sun_[a-z]{16}\.jpg",
                "framesdb": r"frame_[a-z0-9]{16}\.jpg", "emodb_small": r"[a-z0-9]{18}\.jpg"}
    stems = []
    for split, recs in records.items():
        for rec in recs:
            db = rec.original_database.name
            assert rec.folder == f"{db}/images" and re.fullmatch(patterns[db], rec.filename)
            with Image.open(root / "EMOTIC/images" / rec.folder / rec.filename) as im:
                assert im.size == (rec.image_size.n_col, rec.image_size.n_row) == (64, 48)
            persons = np.atleast_1d(rec.person)
            assert 1 <= len(persons) <= 3
            for person in persons:
                x1, y1, x2, y2 = person.body_bbox
                assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 48
                assert person.gender in ("Male", "Female") and person.age in ("Adult", "Teenager", "Kid")
                if split == "train":
                    assert isinstance(person.annotations_continuous, scipy.io.matlab.mat_struct)
                anns = np.atleast_1d(person.annotations_continuous)
                assert len(anns) == 1 if split == "train" else 2 <= len(anns) <= 4
                for ann in anns:
                    for value in (ann.valence, ann.arousal, ann.dominance):
                        assert value == int(value) and 1 <= value <= 10
            stems.append(Path(rec.filename).stem)
    assert len(set(stems)) == 12
    emo = pd.read_csv(root / "EMOTIC/emotions.csv")
    assert sorted(stems) == emo.image_id.tolist() and set(emo.emotion) <= set(IMAGE_EMOTIONS)
    # Also readable as record arrays (scipy's default).
    plain = scipy.io.loadmat(root / "EMOTIC/Annotations.mat")
    assert plain["train"].shape == (1, 10) and plain["train"].dtype.names == (
        "filename", "folder", "image_size", "original_database", "person")


def test_mat_encoder_is_savemat_byte_for_byte(tmp_path):
    ann = MatStruct(("valence", "arousal", "dominance"), ((5.0, 6.0, 7.0), (4.0, 9.0, 1.0)))
    person = MatStruct(("body_bbox", "annotations_continuous", "gender", "age"),
                       (((1.0, 2.0, 30.0, 40.0), ann, "Male", "Adult"),))
    recs = MatStruct(("filename", "folder", "image_size", "original_database", "person"),
                     (("COCO_val2014_000000000042.jpg", "mscoco/images",
                       MatStruct(("n_col", "n_row"), ((640.0, 480.0),)), MatStruct(("name",), (("mscoco",),)),
                       person),
                      ("abc.jpg", "emodb_small/images", MatStruct(("n_col", "n_row"), ((320.0, 240.0),)),
                       MatStruct(("name",), (("emodb_small",),)), person)))

    def numpy_struct(s: MatStruct) -> np.ndarray:
        arr = np.empty((1, len(s.rows)), dtype=[(f, object) for f in s.fields])
        for i, row in enumerate(s.rows):
            arr[0, i] = tuple(numpy_struct(x) if isinstance(x, MatStruct) else
                              np.array(x, dtype=float) if isinstance(x, tuple) else
                              np.array(x) for x in row)
        return arr

    ours = tmp_path / "ours.mat"
    write_mat5(ours, {"train": recs, "val": ann}, "test")
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"train": numpy_struct(recs), "val": numpy_struct(ann)})
    assert ours.read_bytes()[:128].startswith(b"MATLAB 5.0 MAT-file")
    assert ours.read_bytes()[128:] == buf.getvalue()[128:]


# ---------------------------------------------------------------------------------------------- determinism


def test_deterministic_and_seeded(tiny, tmp_path):
    root, _ = tiny
    first = all_files(root)
    synthesize(TINY, tmp_path / "again", progress=False)
    again = all_files(tmp_path / "again")
    assert list(again) == list(first)
    assert [k for k in first if first[k] != again[k]] == []
    synthesize({**TINY, "seed": 12}, tmp_path / "other", progress=False)
    other = all_files(tmp_path / "other")
    assert other["README.txt"] != first["README.txt"]
    for rel in ("DEAM/annotations/valence.csv", STATIC, "IAPS/AllSubjects_1-20.txt", "NAPS/NAPS_ratings.csv",
                "EMOTIC/Annotations.mat"):
        assert other[rel] != first[rel], rel
    audio = [{v for k, v in files.items() if k.endswith(".wav")} for files in (first, other)]
    assert len(audio[1]) == 5 and not audio[0] & audio[1]


def test_failure_leaves_previous_corpus(tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "marker").write_text("old")

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synth, "_write_emotic", boom)
    with pytest.raises(RuntimeError):
        synthesize(TINY, out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]
    assert [p.name for p in out.iterdir()] == ["marker"]


def test_bad_params():
    with pytest.raises(ImemError, match="n_long_songs"):
        synthesize({**TINY, "n_long_songs": 59}, "/nonexistent/never", progress=False)
    with pytest.raises(ImemError, match="long_song_seconds"):
        synthesize({**TINY, "long_song_seconds": [10, 30]}, "/nonexistent/never", progress=False)
    with pytest.raises(ImemError, match="synth.n_song"):
        synthesize({**TINY, "n_song": 3}, "/nonexistent/never", progress=False)


def test_emotion_rule():
    assert IMAGE_TO_MUSIC_EMOTION == {"excitement": "exciting", "amusement": "funny", "contentment": "happy",
                                      "anger": "angry", "sadness": "sad", "fear": "scary"}
    assert list(IMAGE_TO_MUSIC_EMOTION.values()) == MUSIC_EMOTIONS
    v = [0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.5, 0.49]
    a = [0.8, 0.5, 0.2, 0.8, 0.6, 0.2, 0.65, 0.7]
    assert image_emotion(v, a).tolist() == ["excitement", "amusement", "contentment", "fear", "anger", "sadness",
                                            "excitement", "fear"]


# ---------------------------------------------------------------------------------------------- label-only


def test_imemnet_scale_media_mode_renders_the_label_only_songs(labels, monkeypatch, tmp_path):
    """``imemnet_scale``: the full corpus at IMEMNet's counts -- the same songs (ids, lengths, 35,817 clips) and
    image counts as the label-only mode, so the on-demand scale run and the pair benchmark agree. The
    rendering itself (about 10 GB) is replaced here by a recorder of what would be rendered."""
    from imem.params import section

    p = section("synth", {"synth": dict(TINY)})
    plan = synth._deam_songs(p, True)
    assert (plan.ids <= 2000).sum() == 1744 and (plan.ids > 2000).sum() == 58
    assert int(np.maximum(plan.durations // 2 - 9, 0).sum()) == 35817
    rendered, images = [], {}
    monkeypatch.setattr(synth, "_render_song", lambda sr, seconds, *a, **k: rendered.append(seconds) or
                        np.zeros(8, np.int16))  # what would be rendered, not 10 GB of it
    for name in ("iaps", "naps", "emotic"):
        real = getattr(synth, f"_write_{name}")
        monkeypatch.setattr(synth, f"_write_{name}",
                            lambda root, q, n, lo, pr, name=name, real=real: images.setdefault(name, n) and real(root, q, 2, True, pr))
    summary = synth.synthesize({**TINY, "sample_rate": 8000}, tmp_path / "c", progress=False, imemnet_scale=True)
    assert summary["songs"] == 1802 and summary["clips"] == 35817 and summary["imemnet_scale"] is True
    assert images == {"iaps": 1182, "naps": 1356, "emotic": 23082}
    assert sorted(rendered) == sorted(plan.durations.tolist())
    assert "IMEMNet's 35,817 clips" in (tmp_path / "c" / "README.txt").read_text()
    with pytest.raises(SystemExit):  # argparse: the two modes exclude each other
        from imem.cli import main
        main(["synth", "--labels-only", "--imemnet-scale", "--out", str(tmp_path / "x")])



def test_labels_only_imemnet_scale(labels):
    root, summary, elapsed = labels
    assert elapsed < 20, f"label-only generation took {elapsed:.1f} s"
    assert summary == {"labels_only": True, "songs": 1802, "long_songs": 58, "clips": 35817, "iaps": 1182,
                       "naps": 1356, "emotic": 23082, "images": 25620}
    assert not [p for p in root.rglob("*") if p.suffix.lower() in (".wav", ".jpg")]
    assert not (root / "DEAM/MEMD_audio").exists()
    dyn = read_dynamic(root)
    assert len(dyn.song_ids) == 1802
    clips = clip_windows(dyn)
    assert len(clips) == 35817 and clips.clip_id.is_unique
    assert (clips[clips.song_id.astype(int) <= 2000].groupby("song_id").size() == 13).all()
    static = read_static(root)
    assert (static.song_id <= 2000).sum() == 1744 and (static.song_id > 2000).sum() == 58
    assert pd.read_csv(root / "DEAM/captions.csv").clip_id.tolist() == clips.clip_id.tolist()
    assert len(pd.read_csv(root / "DEAM/emotions.csv")) == 35817
    assert len(read_iaps(root)) == 1182 and read_iaps(root).IAPS.is_unique
    assert len(pd.read_csv(root / "NAPS/NAPS_ratings.csv")) == 1356
    mat = load_emotic(root)
    sizes = [len(np.atleast_1d(mat[s])) for s in ("train", "val", "test")]
    assert sum(sizes) == 23082 and sizes[1] == sizes[2] == 2308
    assert len(pd.read_csv(root / "EMOTIC/emotions.csv").image_id.unique()) == 23082
    emo = pd.concat([pd.read_csv(root / f"{s}/emotions.csv") for s in ("IAPS", "NAPS", "EMOTIC")])
    print("image emotions:", emo.emotion.value_counts().to_dict())
    assert set(emo.emotion) == set(IMAGE_EMOTIONS)  # every class occurs at scale
    assert set(pd.read_csv(root / "DEAM/emotions.csv").emotion) == set(MUSIC_EMOTIONS)


def test_label_marginals(labels):
    root = labels[0]
    static = read_static(root)
    v = (static.valence_mean - 1) / 8
    a = (static.arousal_mean - 1) / 8
    in_v, in_a = v.between(0.5, 0.8).mean(), a.between(0.4, 0.7).mean()
    print(f"DEAM static: {in_v:.2f} of valence in 0.5-0.8, {in_a:.2f} of arousal in 0.4-0.7, "
          f"VA Spearman {spearmanr(v, a)[0]:.2f}")
    assert in_v > 0.6 and in_a > 0.5
    assert 0.1 < spearmanr(v, a)[0] < 0.6  # mildly correlated
    iaps = read_iaps(root)
    iv, ia = (iaps.valmn - 1) / 8, (iaps.aromn - 1) / 8
    extreme = (iv - 0.5).abs()
    print(f"IAPS boomerang: Spearman(|v-0.5|, a) = {spearmanr(extreme, ia)[0]:.2f}")
    assert spearmanr(extreme, ia)[0] > 0.5
    naps = pd.read_csv(root / "NAPS/NAPS_ratings.csv")
    print(f"NAPS linear: Spearman(v, a) = {spearmanr(naps.Valence_M, naps.Arousal_M)[0]:.2f}")
    assert spearmanr(naps.Valence_M, naps.Arousal_M)[0] < -0.6
    emo = pd.read_csv(root / "EMOTIC/emotions.csv")
    assert emo.emotion.value_counts().min() > 1000  # near-uniform VA: every class is common


# ---------------------------------------------------------------------------------------------- cues

KRUMHANSL = np.array([[6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88],
                      [6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17]])


def mode_score(chroma: np.ndarray) -> float:
    """Best major-key minus best minor-key Krumhansl profile correlation."""
    best = [max(np.corrcoef(np.roll(KRUMHANSL[m], k), chroma)[0, 1] for k in range(12)) for m in range(2)]
    return best[0] - best[1]


def test_music_cues_are_learnable(cues):
    root = cues
    dyn = read_dynamic(root)
    clips = clip_windows(dyn)
    hop = 512
    rows = []
    for sid, group in clips.groupby("song_id", sort=False):
        y, sr = sf.read(root / f"DEAM/MEMD_audio/{sid}.wav")
        chroma = librosa.feature.chroma_cqt(y=y, sr=sr, hop_length=hop)
        for clip in group.itertuples():
            seg = y[int(clip.start_s * sr):int(clip.end_s * sr)]
            spec = np.abs(librosa.stft(seg, n_fft=4096)).mean(axis=1)
            freqs = librosa.fft_frequencies(sr=sr, n_fft=4096)
            band = (freqs > 80) & (freqs < 1200)
            rows.append({
                "valence": clip.valence, "arousal": clip.arousal,
                "rms": np.sqrt(np.mean(seg**2)),
                "onsets": len(librosa.onset.onset_detect(y=seg, sr=sr)),
                "centroid": librosa.feature.spectral_centroid(y=seg, sr=sr).mean(),
                "mode": mode_score(chroma[:, int(clip.start_s * sr / hop):int(clip.end_s * sr / hop)].mean(axis=1)),
                "register": (spec[band] * np.log2(freqs[band])).sum() / spec[band].sum(),
            })
    feats = pd.DataFrame(rows)
    assert len(feats) == 12 * 13 and feats.notna().all().all()
    rho = {k: spearmanr(feats[k], feats.arousal)[0] for k in ("rms", "onsets", "centroid")}
    rho.update({k: spearmanr(feats[k], feats.valence)[0] for k in ("mode", "register")})
    print("music cues (Spearman, per clip):", {k: round(float(v), 3) for k, v in rho.items()})
    assert rho["rms"] > 0.65 and rho["onsets"] > 0.55 and rho["centroid"] > 0.45
    assert rho["mode"] > 0.2 and rho["register"] > 0.25


def image_features(path: Path) -> tuple[float, float, float, float]:
    with Image.open(path) as im:
        x = np.asarray(im.convert("RGB"), dtype=float) / 255
    gray = x.mean(axis=2)
    warmth = (x[..., 0] - x[..., 2]).mean()
    edges = np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()
    power = np.abs(np.fft.fft2(gray - gray.mean())) ** 2
    radius = np.hypot(np.fft.fftfreq(gray.shape[0])[:, None], np.fft.fftfreq(gray.shape[1])[None, :])
    return warmth, x.mean(), edges, power[radius > 0.1].sum() / power.sum()


def test_image_cues_are_learnable(cues):
    root = cues
    rows = []
    for r in read_iaps(root).itertuples():
        rows.append(("IAPS", (r.valmn - 1) / 8, (r.aromn - 1) / 8, *image_features(iaps_image(root, r.IAPS))))
    for r in pd.read_csv(root / "NAPS/NAPS_ratings.csv").itertuples():
        rows.append(("NAPS", (r.Valence_M - 1) / 8, (r.Arousal_M - 1) / 8,
                     *image_features(root / f"NAPS/images/{r.ID}.jpg")))
    mat = load_emotic(root)
    for split in ("train", "val", "test"):
        for rec in np.atleast_1d(mat[split]):
            anns = [a for p in np.atleast_1d(rec.person) for a in np.atleast_1d(p.annotations_continuous)]
            rows.append(("EMOTIC", (np.mean([a.valence for a in anns]) - 1) / 9,
                         (np.mean([a.arousal for a in anns]) - 1) / 9,
                         *image_features(root / "EMOTIC/images" / rec.folder / rec.filename)))
    feats = pd.DataFrame(rows, columns=["source", "valence", "arousal", "warmth", "brightness", "edges", "highfreq"])
    assert len(feats) == 120
    for source, g in [*feats.groupby("source"), ("all", feats)]:
        rho = {"warmth": spearmanr(g.warmth, g.valence)[0], "brightness": spearmanr(g.brightness, g.valence)[0],
               "edges": spearmanr(g.edges, g.arousal)[0], "highfreq": spearmanr(g.highfreq, g.arousal)[0]}
        print(f"image cues {source} (Spearman):", {k: round(float(v), 3) for k, v in rho.items()})
        if source == "all":
            assert rho["warmth"] > 0.75 and rho["brightness"] > 0.5
            assert rho["edges"] > 0.7 and rho["highfreq"] > 0.55
        else:
            assert rho["warmth"] > 0.6 and rho["edges"] > 0.55
