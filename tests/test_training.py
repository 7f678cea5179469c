"""Models, training loop, checkpoints/resume and MLflow tracking on a tiny corpus."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_fixtures import prepared_pipeline
from imem.errors import ImemError
from imem.losses import NonFiniteLoss
from imem.models.encoders import Head, ResNetBackbone, ViTBackbone, build_backbone
from imem.params import section
from imem.training import train_variant, variant_config

TINY_ENCODERS = {
    "r18": {"type": "resnet", "arch": "resnet18", "pretrained": None},
    "vit_tiny": {"type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 64, "image_size": 32, "patch_size": 8, "pretrained": None},
    "beats_small": {"type": "beats", "size": "small", "pretrained": None},
}
VARIANTS = {
    "cnn": {"kind": "matching", "image_encoder": "r18", "music_encoder": "r18", "image_head": "pool", "music_head": "pool"},
    "transformer_v1": {"kind": "matching", "image_encoder": "vit_tiny", "music_encoder": "beats_small",
                       "image_head": "flatten", "music_head": "flatten", "lr": 1e-4},
    "transformer_v2": {"kind": "matching", "image_encoder": "vit_tiny", "music_encoder": "beats_small",
                       "image_head": "cls", "music_head": "cls"},
    "unimodal_image": {"kind": "unimodal_image", "image_encoder": "r18", "image_head": "pool"},
    "unimodal_music": {"kind": "unimodal_music", "music_encoder": "r18", "music_head": "pool"},
}


def _cfg(variant, **common):
    raw = {"train": {"common": {"epochs": 2, "batch_size": 16, "cache_batch_size": 16, **common},
                     "encoders": TINY_ENCODERS, "variants": VARIANTS}}
    return variant_config(section("train", raw), variant)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    prepared_pipeline(tmp)
    return tmp


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_short_run_per_variant(pipeline, variant, tmp_path):
    rep = train_variant(_cfg(variant), pipeline / "prepare", pipeline / "features", tmp_path / "m", tmp_path / "r",
                        track=False, progress=False)
    assert rep["finished"] and rep["epochs"] == 2
    assert (tmp_path / "m" / "best.pt").is_file() and (tmp_path / "m" / "last.pt").is_file()
    hist = (tmp_path / "r" / "history.csv").read_text().splitlines()
    assert len(hist) == 3
    cols = hist[0].split(",")
    if VARIANTS[variant]["kind"] == "matching":
        for name in ("cfr", "cfm", "sfr_image", "sfr_music", "sim", "va_image", "va_music", "total"):
            assert f"train/{name}" in cols and f"val/{name}" in cols
        assert np.isfinite(rep["test/sim_mse"]) and "test/sim_mse_mean_predictor" in rep
    else:
        side = VARIANTS[variant]["kind"].split("_")[1]
        assert f"train/va_{side}" in cols and "train/cfr" not in cols
        assert f"test/{side}_valence_mse" in rep


def test_unimodal_fine_tuning_trains_the_entire_model(pipeline, tmp_path):
    """Thesis 5.1.1: the unimodal regressors "trained the entire model": with fc_only: false the backbone's
    weights move too, not only the head and the VA decoder."""
    from imem.training import Trainer

    cfg = _cfg("unimodal_image", epochs=1, fc_only=False)
    init = {k: v.clone() for k, v in Trainer(cfg, pipeline / "prepare", pipeline / "features", progress=False)
            .model.state_dict().items()}
    train_variant(cfg, pipeline / "prepare", pipeline / "features", tmp_path / "m", tmp_path / "r",
                  track=False, progress=False)
    last = torch.load(tmp_path / "m" / "last.pt", weights_only=True)["model"]
    weights = [k for k in init if k.endswith("weight") and init[k].is_floating_point()]
    moved = {k.split(".")[0] for k in weights if not torch.equal(init[k], last[k])}
    assert {"backbone", "head", "va"} <= moved


def test_resume_ends_with_the_same_weights_and_metrics(pipeline, tmp_path):
    cfg = _cfg("cnn", epochs=2, fc_only=False)  # full fine-tuning: backbone weights and BN stats change too
    full = train_variant(cfg, pipeline / "prepare", pipeline / "features", tmp_path / "a", tmp_path / "ra",
                         track=False, progress=False)
    part = train_variant(cfg, pipeline / "prepare", pipeline / "features", tmp_path / "b", tmp_path / "rb",
                         track=False, progress=False, stop_after=1)
    assert not part["finished"]
    resumed = train_variant(cfg, pipeline / "prepare", pipeline / "features", tmp_path / "b", tmp_path / "rb",
                            track=False, progress=False, resume=True)
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (tmp_path / "ra" / "history.csv").read_bytes() == (tmp_path / "rb" / "history.csv").read_bytes()
    assert {k: v for k, v in full.items()} == {k: v for k, v in resumed.items()}


@pytest.mark.parametrize("head", ["cls", "mean"])
def test_frozen_cache_keeps_only_what_the_head_reads_and_trains_the_same(pipeline, tmp_path, monkeypatch, head):
    """Issue 14 item 4: a CLS/mean head's frozen cache holds one vector per item, not the token sequence,
    and training on it gives the very numbers that training on the cached sequences gives."""
    import imem.training as training

    cfg = dict(_cfg("transformer_v2"), image_head=head, music_head=head)
    t = training.Trainer(cfg, pipeline / "prepare", pipeline / "features", progress=False)
    t.build_cache()
    for side in ("image", "music"):
        feats, _ = t.cache[side]
        assert feats.dim() == 2 and feats.shape[1] == t._head(side).fc.in_features, (side, feats.shape)
    reduced = train_variant(cfg, pipeline / "prepare", pipeline / "features", tmp_path / "a", tmp_path / "ra",
                            track=False, progress=False)
    whole = training.backbone_cache
    monkeypatch.setattr(training, "backbone_cache", lambda *a, **k: whole(*a[:7]))  # no reduce: whole sequences
    t = training.Trainer(cfg, pipeline / "prepare", pipeline / "features", progress=False)
    t.build_cache()
    assert t.cache["image"][0].dim() == 3
    full = train_variant(cfg, pipeline / "prepare", pipeline / "features", tmp_path / "b", tmp_path / "rb",
                         track=False, progress=False)
    assert (tmp_path / "ra" / "history.csv").read_bytes() == (tmp_path / "rb" / "history.csv").read_bytes()
    assert reduced == full


def test_resume_without_checkpoint(pipeline, tmp_path):
    with pytest.raises(ImemError, match=r"--resume: no checkpoint at .*last.pt"):
        train_variant(_cfg("cnn"), pipeline / "prepare", pipeline / "features", tmp_path / "m", tmp_path / "r",
                      track=False, progress=False, resume=True)


def test_resume_refuses_changed_params_in_one_line(pipeline, tmp_path):
    """Issue 16 item 5: a resume continues the exact config; a changed lr, epoch count or optimizer is
    refused naming the keys (before, epochs 3-4 trained at the old lr while MLflow recorded the new one)."""
    cfg = _cfg("unimodal_music", epochs=2)
    train_variant(cfg, pipeline / "prepare", pipeline / "features", tmp_path / "m", tmp_path / "r",
                  track=False, progress=False)
    changed = dict(cfg, epochs=4, lr=0.05, optimizer="adamw")
    with pytest.raises(ImemError, match=r"--resume: params changed since .*last\.pt was written: epochs \(2 -> 4\), "
                                        r"lr \(0\.001 -> 0\.05\), optimizer \('sgd' -> 'adamw'\); a resume continues "
                                        r"the exact config"):
        train_variant(changed, pipeline / "prepare", pipeline / "features", tmp_path / "m", tmp_path / "r",
                      track=False, progress=False, resume=True)
    # a key that changes only how fast (threads) may differ
    again = train_variant(dict(cfg, cpu_threads=1), pipeline / "prepare", pipeline / "features", tmp_path / "m",
                          tmp_path / "r", track=False, progress=False, resume=True)
    assert again["finished"] and again["epochs"] == 2


_KILLED_TRAIN = """
import os, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_training import _cfg
from imem.training import train_variant

def die(row):
    if row["epoch"] == 2:
        os.kill(os.getpid(), 9)  # kill -9 right after epoch 2 was checkpointed

train_variant(_cfg("unimodal_music", epochs=4), {prep!r}, {feat!r}, {m!r}, {r!r}, progress=False, on_epoch=die)
"""


def test_a_killed_run_is_marked_killed_and_resume_continues_the_same_mlflow_run(pipeline, tmp_path, monkeypatch):
    """Issue 16 item 6: after kill -9 the MLflow run is RUNNING; the next start marks it KILLED (its pid is
    gone), and --resume continues that same run, which ends FINISHED with all four epochs' metrics and the
    same numbers as an uninterrupted run."""
    import subprocess
    import sys

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    here = Path(__file__).resolve().parent
    code = _KILLED_TRAIN.format(root=str(here.parent), tests=str(here), prep=str(pipeline / "prepare"),
                                feat=str(pipeline / "features"), m=str(tmp_path / "m"), r=str(tmp_path / "r"))
    for _ in range(2):  # two killed runs: the second start marks the first KILLED
        assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLFLOW_TRACKING_URI": uri}).returncode == -9
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["imem-train"], order_by=["attributes.start_time ASC"])
    assert runs["status"].tolist() == ["KILLED", "RUNNING"]
    assert "its process was gone" in runs["tags.imem.killed"].iloc[0]
    killed_id = runs["run_id"].iloc[1]
    resumed = train_variant(_cfg("unimodal_music", epochs=4), pipeline / "prepare", pipeline / "features",
                            tmp_path / "m", tmp_path / "r", progress=False, resume=True)
    runs = mlflow.search_runs(experiment_names=["imem-train"], order_by=["attributes.start_time ASC"])
    assert runs["status"].tolist() == ["KILLED", "FINISHED"] and runs["run_id"].iloc[1] == killed_id
    assert runs["tags.imem.resumes"].iloc[1] == "1"
    steps = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(killed_id, "train/va_music")]
    assert sorted(steps) == [1, 2, 3, 4]
    straight = train_variant(_cfg("unimodal_music", epochs=4), pipeline / "prepare", pipeline / "features",
                             tmp_path / "s", tmp_path / "rs", track=False, progress=False)
    assert resumed == straight
    import pandas as pd

    a, b = (pd.read_csv(tmp_path / d / "history.csv") for d in ("r", "rs"))
    pd.testing.assert_frame_equal(a, b)


_KILLED_BETWEEN_TAG_AND_WRITE = """
import os, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_training import _cfg
import imem.training as t

real, saves = t.save, []

def save(obj, path, before_write=None):
    if path.name == "last.pt":
        saves.append(path)
        if len(saves) == 2:  # epoch 2: the run is tagged with the new hash, then kill -9 before the file is written
            real(obj, path.with_name("discarded.pt"), before_write=before_write)
            os.kill(os.getpid(), 9)
    real(obj, path, before_write=before_write)

t.save = save
t.train_variant(_cfg("unimodal_music", epochs=3), {prep!r}, {feat!r}, {m!r}, {r!r}, progress=False)
"""


def test_a_kill_between_the_run_tag_and_the_checkpoint_write_still_resumes_the_same_run(pipeline, tmp_path,
                                                                                      monkeypatch):
    """last.pt's run is found by the file's hash; the tag is written before the file, with the hash it
    replaces beside it, so a kill between the two leaves last.pt of epoch 1, which --resume still finds."""
    import subprocess
    import sys

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    here = Path(__file__).resolve().parent
    code = _KILLED_BETWEEN_TAG_AND_WRITE.format(root=str(here.parent), tests=str(here), prep=str(pipeline / "prepare"),
                                                feat=str(pipeline / "features"), m=str(tmp_path / "m"),
                                                r=str(tmp_path / "r"))
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLFLOW_TRACKING_URI": uri}).returncode == -9
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["imem-train"], output_format="list")
    from imem.io import file_sha256

    assert run.data.tags["imem.prev_last_sha256"] == file_sha256(tmp_path / "m" / "last.pt")  # epoch 1's file
    assert run.data.tags["imem.last_sha256"] == file_sha256(tmp_path / "m" / "discarded.pt")  # never written
    train_variant(_cfg("unimodal_music", epochs=3), pipeline / "prepare", pipeline / "features", tmp_path / "m",
                  tmp_path / "r", progress=False, resume=True)
    runs = mlflow.search_runs(experiment_names=["imem-train"], output_format="list")
    assert [r.info.run_id for r in runs] == [run.info.run_id] and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["imem.last_sha256"] == file_sha256(tmp_path / "m" / "last.pt")
    steps = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/va_music")}
    assert steps == {1, 2, 3}


def test_nan_loss_stops_training_and_marks_the_mlflow_run_failed(pipeline, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(NonFiniteLoss, match=r"variant cnn, epoch \d+: non-finite loss"):
        train_variant(_cfg("cnn", lr=1e12, epochs=5), pipeline / "prepare", pipeline / "features", tmp_path / "m",
                      tmp_path / "r", progress=False)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["imem-train"])
    assert runs["status"].tolist() == ["FAILED"]


def test_mlflow_run_records_params_epochs_artifacts_and_a_loadable_model(pipeline, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train_variant(_cfg("transformer_v2"), pipeline / "prepare", pipeline / "features", tmp_path / "m", tmp_path / "r",
                  progress=False)
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["imem-train"], output_format="list")[0]
    # named so that re-runs differ: the variant and the git short sha (a DVC experiment's name under dvc exp run)
    assert run.info.status == "FINISHED" and run.info.run_name == f"transformer_v2 @{run.data.tags['git.commit'][:7]}"
    assert mlflow.get_experiment_by_name("imem-train").tags["mlflow.note.content"].startswith("imem train stages")
    assert run.data.params["image_head"] == "cls" and run.data.params["lr"] == "0.001"
    assert run.data.tags["imem.variant"] == "transformer_v2" and "git.commit" in run.data.tags
    client = mlflow.tracking.MlflowClient()
    hist = client.get_metric_history(run.info.run_id, "train/cfr")
    assert [m.step for m in hist] == [1, 2]
    for name in ("val/total", "lr", "epoch_seconds", "test/sim_mse"):
        assert name in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "history.csv", "metrics.json"} <= arts
    # the logged model is a pyfunc from code (nothing pickled) around best.pt: it predicts like the checkpoint
    import pandas as pd

    from imem.inference import Predictor, load_model, predict

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = list(pd.read_csv(pipeline / "prepare" / "test" / "images.csv")["path"][:3])
    got = pd.DataFrame(model.predict(images))
    want = predict(images, Predictor(load_model(tmp_path / "m" / "best.pt"), image_size=32, progress=False))
    pd.testing.assert_frame_equal(got[["file", "type", "valence", "arousal"]], want[["file", "type", "valence", "arousal"]])
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/MLmodel" in model_files and not [f for f in model_files if f.endswith((".pkl", ".pth"))]
    with pytest.raises(mlflow.exceptions.MlflowException):  # the signature: a list of strings
        model.predict([1.5])


# --- encoders, heads, pretrained weights -------------------------------------------------------------

def test_flatten_head_refuses_another_sequence_length():
    vit = ViTBackbone(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      image_size=32, patch_size=8)
    head = Head(vit, "flatten", 16)
    assert vit.seq_len == 17
    assert head(torch.randn(2, 17, 32)).shape == (2, 16)
    with pytest.raises(ImemError, match="head v1 \\(flatten\\) was built for sequences of 17 tokens, got 10"):
        head(torch.randn(2, 10, 32))
    assert Head(vit, "cls", 16)(torch.randn(2, 10, 32)).shape == (2, 16)  # v2 takes any length


def test_beats_cls_is_the_token_mean():
    bb = build_backbone({"type": "beats", "size": "small"})
    assert bb.seq_len == 96 and not bb.has_cls
    h = Head(bb, "cls", 8, norm="none")
    x = torch.randn(3, 96, bb.out_dim)
    torch.testing.assert_close(h(x), h.fc(x.mean(dim=1)))


def test_head_strategy_mismatches():
    with pytest.raises(ImemError, match="head 'flatten' needs a transformer"):
        Head(ResNetBackbone("resnet18"), "flatten")
    with pytest.raises(ImemError, match="head 'pool' is for CNN encoders"):
        Head(build_backbone({"type": "beats", "size": "small"}), "pool")


def test_loading_a_saved_torchvision_state_dict(tmp_path, monkeypatch):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    bb = ResNetBackbone("resnet18", str(tmp_path / "r18.pth"))
    torch.testing.assert_close(bb.net.conv1.weight, ref.conv1.weight)
    # a torchvision weights name resolves from the local torch hub cache, never from the network
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    url_name = Path(torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1").url).name
    with pytest.raises(ImemError, match=rf"ResNet18_Weights.IMAGENET1K_V1: .*{url_name} not found; nothing is downloaded"):
        ResNetBackbone("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "th" / "hub" / "checkpoints" / url_name)
    bb = ResNetBackbone("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    torch.testing.assert_close(bb.net.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    # a state dict of another architecture: one clear line
    with pytest.raises(ImemError, match=r"r18.pth: state dict does not fit the model: missing key 'layer1.0.conv3.weight'"):
        ResNetBackbone("resnet50", str(tmp_path / "r18.pth"))


def test_loading_a_saved_transformers_vit(tmp_path):
    from transformers import ViTConfig, ViTModel

    ref = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False)
    ref.save_pretrained(tmp_path / "vit")
    bb = ViTBackbone(pretrained=str(tmp_path / "vit"))
    x = torch.randn(1, 3, 32, 32)
    ref.eval()
    bb.eval()
    torch.testing.assert_close(bb(x), ref(pixel_values=x).last_hidden_state)
    with pytest.raises(ImemError, match="pretrained ViT: directory .*nowhere not found"):
        ViTBackbone(pretrained=str(tmp_path / "nowhere"))


def test_image_normalisation_follows_the_checkpoint(tmp_path):
    """A ViT normalises with its checkpoint's preprocessor_config.json (google's: 0.5), not ImageNet's."""
    from transformers import ViTImageProcessor

    from imem.features.store import IMAGENET_MEAN, IMAGENET_STD
    from imem.training import image_normalisation

    assert image_normalisation({"type": "resnet"}) == (IMAGENET_MEAN, IMAGENET_STD)
    default = ViTImageProcessor()  # what google's ViT checkpoints ship
    assert image_normalisation({"type": "vit", "pretrained": None}) == (tuple(default.image_mean), tuple(default.image_std))
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path / "vit")
    assert image_normalisation({"type": "vit", "pretrained": str(tmp_path / "vit")}) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    (tmp_path / "vit" / "preprocessor_config.json").write_text('{"image_mean": [0.5]}')
    with pytest.raises(ImemError, match=r"preprocessor_config.json: no usable image_mean / image_std"):
        image_normalisation({"type": "vit", "pretrained": str(tmp_path / "vit")})


def test_loading_a_saved_beats_checkpoint(tmp_path):
    from imem.models.beats import save_beats

    src = build_backbone({"type": "beats", "size": "small"})
    save_beats(src.beats, tmp_path / "beats.pt")
    bb = build_backbone({"type": "beats", "pretrained": str(tmp_path / "beats.pt")})
    src.eval()
    bb.eval()
    x = torch.randn(2, 198, 128)
    torch.testing.assert_close(bb(x), src(x))


def test_unknown_variant_and_encoder_keys():
    with pytest.raises(ImemError, match="no variant 'cnnn'"):
        _cfg("cnnn")
    raw = {"train": {"common": {}, "encoders": TINY_ENCODERS,
                     "variants": {"x": {"kind": "matching", "image_encoder": "r50", "music_encoder": "r18"}}}}
    with pytest.raises(ImemError, match=r"train.variants.x.image_encoder = 'r50' is not under train.encoders"):
        variant_config(section("train", raw), "x")
    with pytest.raises(ImemError, match=r"unknown key 'train.common.lrr'"):
        section("train", {"train": {"common": {"lrr": 1}}})


def test_separate_va_decoder_reads_the_features_without_shaping_them():
    """va_decoder: separate (CDCML 6.1.2's separate VA predictor): the VA loss trains the VA decoders only."""
    from imem.models.matching import MatchingModel

    bb = ResNetBackbone("resnet18")
    h = torch.randn(6, bb.out_dim)
    grads = {}
    for mode in ("joint", "separate"):
        torch.manual_seed(0)
        m = MatchingModel(bb, bb, "pool", "pool", embed_dim=8, hidden=(4,), va_decoder=mode)
        out = m.heads(h, h)
        out["va_image"].pow(2).sum().backward()
        grads[mode] = (m.image_head.fc.weight.grad, m.va_image[0].weight.grad)
    assert grads["joint"][0].abs().sum() > 0
    assert grads["separate"][0] is None or grads["separate"][0].abs().sum() == 0  # no VA gradient into the head
    torch.testing.assert_close(grads["separate"][1], grads["joint"][1])  # the decoder learns the same either way
    with pytest.raises(ImemError, match=r"train va_decoder = 'both' is not one of: joint, separate"):
        MatchingModel(bb, bb, "pool", "pool", va_decoder="both")
