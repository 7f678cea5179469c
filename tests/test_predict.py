"""`imem predict`: model loading (directory, MLflow URI), inputs equal to the training inputs, long audio
windows, and the one-line errors on bad input."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from PIL import Image

from corpus_fixtures import prepared_pipeline
from imem.cli import main
from imem.errors import ImemError
from imem.features.store import FeatureStore
from imem.inference import Predictor, load_model, predict
from imem.params import section
from imem.training import Inputs, train_variant, variant_config

IMAGE_SIZE = 32
ENCODERS = {"r18": {"type": "resnet", "arch": "resnet18", "pretrained": None}}
VARIANTS = {
    "cnn": {"kind": "matching", "image_encoder": "r18", "music_encoder": "r18", "image_head": "pool",
            "music_head": "pool"},
    "unimodal_image": {"kind": "unimodal_image", "image_encoder": "r18", "image_head": "pool"},
}


def tiny_cfg(variant: str) -> dict:
    raw = {"train": {"common": {"epochs": 2, "batch_size": 16, "cache_batch_size": 16},
                     "encoders": ENCODERS, "variants": VARIANTS}}
    return variant_config(section("train", raw), variant)


def build_pipeline(tmp: Path) -> Path:
    """A tiny corpus, prepared, its feature store (32-px images) and two trained variants under ``tmp``."""
    prepared_pipeline(tmp, image_size=IMAGE_SIZE)
    for v in VARIANTS:
        train_variant(tiny_cfg(v), tmp / "prepare", tmp / "features", tmp / "models" / v, tmp / "reports" / v,
                      track=False, progress=False)
    (tmp / "params.yaml").write_text(f"features:\n  image_size: {IMAGE_SIZE}\n")
    return tmp


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Built once per test session (test_retrieve.py uses it too), in the session's temporary folder."""
    tmp = tmp_path_factory.getbasetemp() / "imem-tiny-pipeline"
    if not (tmp / "done").is_file():
        build_pipeline(tmp)
        (tmp / "done").write_text("")
    return tmp


def _clips(pipeline: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(pipeline / "prepare" / s / "clips.csv", dtype={"clip_id": str, "song_id": str})
                      for s in ("train", "val", "test")], ignore_index=True)


def _images(pipeline: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(pipeline / "prepare" / s / "images.csv", dtype={"image_id": str})
                      for s in ("train", "val", "test")], ignore_index=True)


def _store_embedding(loaded, store: FeatureStore, side: str, rows) -> torch.Tensor:
    m = loaded.model
    backbone, head = (m.image_backbone, m.image_head) if side == "image" else (m.music_backbone, m.music_head)
    with torch.no_grad():
        return head(backbone(Inputs(store, loaded.cfg[f"{side}_encoder"], side)(torch.as_tensor(rows))))


def test_inputs_from_files_equal_the_training_inputs(pipeline):
    """A clip window cut from its song's audio file and an image decoded from its file embed exactly as the
    feature-store rows the model was trained on."""
    loaded = load_model(pipeline / "models" / "cnn")
    pred = Predictor(loaded, image_size=IMAGE_SIZE, progress=False)
    store = FeatureStore(pipeline / "features")
    clips = _clips(pipeline)
    song = clips[clips["song_id"] == "2005"].iloc[[0, 5, 11]]  # the 61-s song
    w = pred.embed_audio(song["audio_path"].iloc[0], starts=song["start_s"].to_numpy())
    ref = _store_embedding(loaded, store, "music", store.clip_rows(song["clip_id"]))
    assert w.f.shape == ref.shape == (3, 512)
    torch.testing.assert_close(w.f, ref, atol=1e-5, rtol=1e-5)
    # the default grid (every 2 s from 0) holds the clips' windows: clip k starts at 2(k-1) s
    full = pred.embed_audio(song["audio_path"].iloc[0])
    at = [int(np.flatnonzero(np.isclose(full.starts, s))[0]) for s in song["start_s"]]
    torch.testing.assert_close(full.f[at], ref, atol=1e-5, rtol=1e-5)

    images = _images(pipeline).iloc[:5]
    f, va = pred.embed_images([Path(p) for p in images["path"]])
    ref_i = _store_embedding(loaded, store, "image", store.image_rows(images["image_id"]))
    torch.testing.assert_close(f, ref_i, atol=1e-5, rtol=1e-5)
    assert va.shape == (5, 2) and bool(((va > 0) & (va < 1)).all())


def test_predict_long_audio_windows_and_aggregate(pipeline, tmp_path):
    loaded = load_model(pipeline / "models" / "cnn")
    song = pipeline / "corpus" / "DEAM" / "MEMD_audio" / "2005.wav"  # 61 s
    image = Path(_images(pipeline)["path"].iloc[0])
    df = predict([image, song], Predictor(loaded, image_size=IMAGE_SIZE, progress=False))
    assert df["file"].iloc[0] == str(image) and df["type"].iloc[0] == "image"
    win = df[(df["type"] == "audio") & (df["window"] != "mean")]
    assert len(win) == 30  # windows [2i, 2i + 2) for i = 0..29; the last 1 s is shorter than a window
    np.testing.assert_allclose(win["start_s"], np.arange(30) * 2.0)
    mean = df[df["window"] == "mean"].iloc[0]
    assert mean["windows"] == 30 and mean["end_s"] == 60.0
    np.testing.assert_allclose([mean["valence"], mean["arousal"]], win[["valence", "arousal"]].mean(), atol=1e-6)
    # a 1-s hop over the first 12.5 s: 11 windows, the even ones the same as above
    y, sr = sf.read(song, dtype="float32")
    sf.write(tmp_path / "excerpt.wav", y[:int(12.5 * sr)], sr)
    hop1 = predict([tmp_path / "excerpt.wav"], Predictor(loaded, image_size=IMAGE_SIZE, hop=1.0, progress=False))
    w1 = hop1[hop1["window"] != "mean"]
    assert len(w1) == 11
    np.testing.assert_allclose(w1[["valence", "arousal"]].to_numpy()[::2], win[["valence", "arousal"]][:6], atol=1e-4)


def test_short_audio_is_padded_and_silence_is_skipped(pipeline, tmp_path):
    loaded = load_model(pipeline / "models" / "cnn")
    pred = Predictor(loaded, image_size=IMAGE_SIZE, progress=False)
    rng = np.random.default_rng(3)
    y = (0.1 * rng.standard_normal(44100 * 7)).astype(np.float32)
    y[44100 * 2:44100 * 4] = 0.0  # the second 2-s window is digital silence (44.1 kHz: no resampling ringing)
    sf.write(tmp_path / "gap.flac", y, 44100)
    w = pred.embed_audio(tmp_path / "gap.flac")
    assert w.skipped == [2.0] and w.starts.tolist() == [0.0, 4.0]
    sf.write(tmp_path / "short.wav", y[:22050], 22050)  # 0.5 s at 22.05 kHz: one zero-padded window
    assert pred.embed_audio(tmp_path / "short.wav").starts.tolist() == [0.0]
    sf.write(tmp_path / "silent.wav", np.zeros(44100 * 3, np.float32), 44100)
    with pytest.raises(ImemError, match=r"silent.wav is silent in every 2-s window"):
        pred.embed_audio(tmp_path / "silent.wav")


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_gives_one_line_and_exit_1(pipeline, tmp_path, capsys):
    model = str(pipeline / "models" / "cnn")
    params = ["--params", str(pipeline / "params.yaml"), "--quiet"]
    (tmp_path / "notes.txt").write_text("hello")
    assert "unsupported file format '.txt'" in _cli_error(capsys, ["predict", str(tmp_path / "notes.txt"),
                                                                  "--model", model, *params])
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEjunk" * 10)
    assert "unreadable audio file" in _cli_error(capsys, ["predict", str(tmp_path / "broken.wav"), "--model", model,
                                                          *params])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert "unreadable image file" in _cli_error(capsys, ["predict", str(tmp_path / "broken.png"), "--model", model,
                                                          *params])
    (tmp_path / "empty").mkdir()
    assert "no image or audio files under" in _cli_error(capsys, ["predict", str(tmp_path / "empty"), "--model",
                                                                  model, *params])
    assert "file not found" in _cli_error(capsys, ["predict", str(tmp_path / "nope.jpg"), "--model", model, *params])
    _png_header_only(tmp_path / "bomb.png", 25_000, 25_000)  # issue 16 item 4's decompression bomb (625 MP)
    assert "bomb.png is too large: 25000 x 25000 = 625,000,000 pixels" in _cli_error(
        capsys, ["predict", str(tmp_path / "bomb.png"), "--model", model, *params])
    assert "no model at" in _cli_error(capsys, ["predict", str(tmp_path / "nope.jpg"), "--model",
                                                str(tmp_path / "models" / "x"), *params])
    song = str(pipeline / "corpus" / "DEAM" / "MEMD_audio" / "10.wav")
    err = _cli_error(capsys, ["predict", song, "--model", str(pipeline / "models" / "unimodal_image"), *params])
    assert "predicts VA for images only, not audio" in err and "10.wav" in err
    # a checkpoint whose weights do not fit its config
    ck = torch.load(pipeline / "models" / "cnn" / "best.pt", weights_only=False)
    ck["config"] = tiny_cfg("unimodal_image")
    torch.save(ck, tmp_path / "mismatch.pt")
    assert "the weights do not fit variant 'unimodal_image'" in _cli_error(
        capsys, ["predict", song, "--model", str(tmp_path / "mismatch.pt"), *params])


def test_cli_predict_prints_and_writes_the_table(pipeline, tmp_path, capsys):
    img = Image.new("RGB", (50, 40), (200, 30, 30))
    img.save(tmp_path / "red.png")
    main(["predict", str(tmp_path / "red.png"), str(pipeline / "corpus" / "DEAM" / "MEMD_audio" / "10.wav"),
          "--model", str(pipeline / "models" / "cnn"), "--params", str(pipeline / "params.yaml"),
          "--out", str(tmp_path / "pred.csv"), "--quiet"])
    out = capsys.readouterr().out
    assert "red.png" in out and "mean" in out and "VA on the prepared labels' [0, 1] scale" in out
    df = pd.read_csv(tmp_path / "pred.csv")
    assert len(df) == 1 + 22 + 1  # the image, 22 windows of the 45-s song, its mean
    assert df["valence"].between(0, 1).all() and df["arousal"].between(0, 1).all()
    # images only: no blank window columns and no audio footnote on the page; the CSV keeps its columns
    main(["predict", str(tmp_path / "red.png"), "--model", str(pipeline / "models" / "cnn"), "--params",
          str(pipeline / "params.yaml"), "--out", str(tmp_path / "img.csv"), "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "type", "valence", "arousal"] and "<NA>" not in "\n".join(lines)
    assert lines[2].startswith("VA on the prepared labels' [0, 1] scale; model ") and "windows" not in lines[2]
    assert list(pd.read_csv(tmp_path / "img.csv").columns) == list(df.columns[:7])


def test_mlflow_model_uri_predicts_like_the_checkpoint(pipeline, tmp_path, monkeypatch):
    """The train stage logs its checkpoints (and a pickled module, for mlflow.pytorch users) to its run
    (imem.training._finish_run); the same done here directly, without training again. imem reads the run's
    checkpoints/best.pt with weights_only, never the pickled module (issue 16 item 1)."""
    import mlflow
    import mlflow.pytorch

    from imem.tracking import mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from_dir = load_model(pipeline / "models" / "cnn")
    with mlflow_run("imem-train", "cnn", {**from_dir.cfg, "corpus": ""}) as run:
        mlflow.pytorch.log_model(from_dir.model, name="model", serialization_format="pickle",
                                 pip_requirements=["torch"])
    with mlflow_run("imem-train", "cnn without checkpoints", {"corpus": ""}) as bare:
        pass
    with pytest.raises(ImemError, match=rf"run {bare.info.run_id} has no checkpoints/best.pt artifact"):
        load_model(f"runs:/{bare.info.run_id}/model")
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_artifact(str(pipeline / "models" / "cnn" / "best.pt"), artifact_path="checkpoints")
    from_run = load_model(f"runs:/{run.info.run_id}/model")
    assert from_run.kind == "matching" and from_run.cfg["music_encoder"]["type"] == "resnet"
    assert from_run.key == from_dir.key  # same weights, same embedding-cache key
    mlflow.register_model(f"runs:/{run.info.run_id}/model", "imem-cnn")
    from_registry = load_model("models:/imem-cnn/1")
    image = _images(pipeline)["path"].iloc[0]
    a, b, c = (predict([image], Predictor(m, image_size=IMAGE_SIZE, progress=False))
               for m in (from_dir, from_run, from_registry))
    np.testing.assert_array_equal(a[["valence", "arousal"]], b[["valence", "arousal"]])
    np.testing.assert_array_equal(a[["valence", "arousal"]], c[["valence", "arousal"]])
    with pytest.raises(ImemError, match=r"cannot load MLflow model runs:/0123abc/model"):
        load_model("runs:/0123abc/model")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_trained_part_checkpoint_rebuilds_its_frozen_backbones(pipeline, tmp_path, variant):
    """A checkpoint without its frozen backbones (what a tuning trial logs, issue 22) loads into the very
    weights training used: the backbones rebuilt from the config's seed hash as recorded, the whole model
    equals the full checkpoint's, and predictions are identical; the caller's RNG is left alone."""
    from imem.checkpoints import BACKBONES, read_checkpoint, save, trained_part

    full_path = pipeline / "models" / variant / "best.pt"
    part = trained_part(read_checkpoint(full_path))
    assert part["backbones"] and set(part["backbones"]) <= set(BACKBONES)
    assert not [k for k in part["model"] if k.split(".", 1)[0] in BACKBONES]
    save(part, tmp_path / "part.pt")
    assert (tmp_path / "part.pt").stat().st_size < full_path.stat().st_size / 5  # heads and decoders only
    rng = torch.get_rng_state()
    full, rebuilt = load_model(full_path), load_model(tmp_path / "part.pt")
    assert torch.equal(torch.get_rng_state(), rng)
    assert rebuilt.key == full.key  # every tensor, the backbones' included
    image = _images(pipeline)["path"].iloc[0]
    a, b = (predict([image], Predictor(m, image_size=IMAGE_SIZE, progress=False)) for m in (full, rebuilt))
    np.testing.assert_array_equal(a[["valence", "arousal"]], b[["valence", "arousal"]])
    # a backbone that does not rebuild as recorded (another seed, a changed pretrained file) is refused
    name = next(iter(part["backbones"]))
    save({**part, "config": {**part["config"], "seed": part["config"]["seed"] + 1}}, tmp_path / "other_seed.pt")
    with pytest.raises(ImemError, match=rf"other_seed.pt: a trained-part checkpoint .* the {name} rebuilt from "
                                        rf"seed {part['config']['seed'] + 1} differs") as e:
        load_model(tmp_path / "other_seed.pt")
    assert "\n" not in str(e.value)


def test_large_images_load_and_only_giant_ones_are_refused(tmp_path, monkeypatch):
    """PIL's decompression-bomb guard is replaced by imem.inference.MAX_IMAGE_PIXELS for user images (they
    are downscaled at once), exactly at that limit and by the header's dimensions, before decoding (issue 16
    item 4: PIL alone refuses only above twice its limit). Scaled down here: PIL's limit 100 px, ours 5,000 px."""
    import imem.inference as inf

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(inf, "MAX_IMAGE_PIXELS", 5000)
    Image.new("RGB", (60, 50), (200, 10, 10)).save(tmp_path / "big.png")  # 3,000 px: PIL alone refuses
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png").load()
    assert inf.load_user_image(tmp_path / "big.png", 16).shape == (16, 16, 3)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored afterwards
    Image.new("RGB", (100, 50), (0, 0, 0)).save(tmp_path / "edge.png")  # exactly the limit: loads
    assert inf.load_user_image(tmp_path / "edge.png", 16).shape == (16, 16, 3)
    Image.new("RGB", (101, 50), (0, 0, 0)).save(tmp_path / "over.png")  # 5,050 px: under PIL's 2x, refused
    with pytest.raises(ImemError, match=r"over\.png is too large: 101 x 50 = 5,050 pixels, over the limit of 5,000"):
        inf.load_user_image(tmp_path / "over.png", 16)
    # refused by the header before decoding: a bomb whose pixel data is cut off is "too large", not "truncated"
    Image.new("RGB", (4000, 4000), (0, 0, 0)).save(tmp_path / "bomb.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "bomb.png").read_bytes()[:200])
    with pytest.raises(ImemError, match=r"cut\.png is too large: 4000 x 4000"):
        inf.load_user_image(tmp_path / "cut.png", 16)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares width x height (valid signature and IHDR with its CRC) and holds almost no pixel
    data: what a decompression bomb looks like to a header check (the issue's was 607 KB for 625 MP)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_the_issues_decompression_bomb_is_refused_in_one_line_everywhere(tmp_path):
    """Issue 16 item 4 at its real size: a PNG declaring 25,000 x 25,000 (625 MP, 4.2 GB when decoded) is
    refused by `imem predict` and by retrieve's thumbnails at MAX_IMAGE_PIXELS (250 MP), before decoding;
    as a corpus image, PIL's own guard refuses it in `prepare` as one ImemError, not a traceback."""
    import imem.inference as inf
    from imem.data.common import check_image
    from imem.html import thumbnail_data_uri

    assert inf.MAX_IMAGE_PIXELS == 250_000_000 < 25_000 * 25_000
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 25_000, 25_000)
    msg = r"bomb\.png is too large: 25000 x 25000 = 625,000,000 pixels, over the limit of 250,000,000"
    with pytest.raises(ImemError, match=msg):
        inf.load_user_image(bomb, 224)
    with pytest.raises(ImemError, match=msg):
        thumbnail_data_uri(bomb)
    with pytest.raises(ImemError, match=r"unreadable image file .*bomb\.png: Image size \(625000000 pixels\) exceeds"):
        check_image(bomb)
