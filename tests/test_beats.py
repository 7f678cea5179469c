"""BEATs re-implementation: official parameter names and shapes, checkpoint round trips and errors, relative
position buckets, gated bias, padding, determinism, gradients."""

import argparse
import math

import pytest
import torch

from imem.errors import ImemError
from imem.features.store import beats_fbank
from imem.models.beats import (
    BEATs,
    BEATsConfig,
    GradMultiply,
    WeightNormConv1d,
    load_beats,
    load_state_dict_checked,
    reduce_padding_mask,
    relative_position_bucket,
    save_beats,
)

# Parameter count of BEATs-base with the iter3 / iter3+ flags (relative position bias shared by all layers,
# counted once; gated bias; no predictor): 90,311,792.
BASE_PARAMS = 90_311_792


def _official_base_keys(layers=12, d=768, ffn=3072, heads=12, embed=512, patch=16, conv_pos=128, groups=16,
                        buckets=320):
    """(key, shape) of an official BEATs-base checkpoint, derived from microsoft/unilm beats/BEATs.py and
    beats/backbone.py (relative_position_embedding, gru_rel_pos, conv_bias=False, finetuned_model=False).
    The pos_conv keys are those of torch.nn.utils.weight_norm(conv, dim=2); relative_attention_bias is one
    module re-registered under every layer, so it appears in every layer."""
    keys = {
        "patch_embedding.weight": (embed, 1, patch, patch),
        "layer_norm.weight": (embed,), "layer_norm.bias": (embed,),
        "post_extract_proj.weight": (d, embed), "post_extract_proj.bias": (d,),
        "encoder.pos_conv.0.weight_g": (1, 1, conv_pos),
        "encoder.pos_conv.0.weight_v": (d, d // groups, conv_pos),
        "encoder.pos_conv.0.bias": (d,),
        "encoder.layer_norm.weight": (d,), "encoder.layer_norm.bias": (d,),
    }
    per_layer = {
        "self_attn.relative_attention_bias.weight": (buckets, heads),
        "self_attn.grep_a": (1, heads, 1, 1),
        "self_attn.grep_linear.weight": (8, d // heads), "self_attn.grep_linear.bias": (8,),
        **{f"self_attn.{p}_proj.{w}": (d, d) if w == "weight" else (d,)
           for p in ("q", "k", "v", "out") for w in ("weight", "bias")},
        "self_attn_layer_norm.weight": (d,), "self_attn_layer_norm.bias": (d,),
        "fc1.weight": (ffn, d), "fc1.bias": (ffn,), "fc2.weight": (d, ffn), "fc2.bias": (d,),
        "final_layer_norm.weight": (d,), "final_layer_norm.bias": (d,),
    }
    for i in range(layers):
        keys.update({f"encoder.layers.{i}.{k}": s for k, s in per_layer.items()})
    return keys


def _small(**over):
    return BEATsConfig.small(**over)


def _fbank(n=2, seconds=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return beats_fbank(0.1 * torch.randn(n, int(16000 * seconds), generator=g))


@pytest.fixture(scope="module")
def fbank():
    return _fbank()


def _model(cfg=None, seed=0):
    torch.manual_seed(seed)
    return BEATs(cfg or _small()).eval()


# ------------------------------------------------------------------------------------------- shapes


def test_two_second_clip_gives_96_tokens(fbank):
    assert fbank.shape == (2, 198, 128)
    model = _model()
    with torch.no_grad():
        feats, mask = model(fbank)
    assert feats.shape == (2, 96, 128) and model.num_tokens(198) == 96
    assert mask.shape == (2, 96) and mask.dtype == torch.bool and not mask.any()
    with torch.no_grad():
        again, _ = model.extract_features(fbank)
    assert torch.equal(feats, again)
    assert torch.isfinite(feats).all()


def test_base_state_dict_matches_official_keys_and_shapes():
    torch.manual_seed(0)
    model = BEATs(BEATsConfig.base())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _official_base_keys()
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))[:5]
    assert got == expected
    assert len(got) == 250
    assert sum(p.numel() for p in model.parameters()) == BASE_PARAMS
    # the relative position bias is one parameter shared by every layer
    layers = model.encoder.layers
    assert all(lay.self_attn.relative_attention_bias is layers[0].self_attn.relative_attention_bias
               for lay in layers)


def test_finetuned_and_variant_configs_have_official_extra_keys():
    ft = BEATs(_small(finetuned_model=True, predictor_class=7)).state_dict()
    assert tuple(ft["predictor.weight"].shape) == (7, 128) and tuple(ft["predictor.bias"].shape) == (7,)
    plain = BEATs(_small(relative_position_embedding=False, gru_rel_pos=False, conv_bias=True,
                         embed_dim=128)).state_dict()
    assert not any("relative_attention_bias" in k or "grep" in k for k in plain)
    assert "post_extract_proj.weight" not in plain  # embed_dim == encoder_embed_dim: no projection
    assert tuple(plain["patch_embedding.bias"].shape) == (128,)
    glu = BEATs(_small(activation_fn="glu")).state_dict()
    assert tuple(glu["encoder.layers.0.fc1.linear.weight"].shape) == (2 * 256, 128)


@pytest.mark.parametrize("over", [
    {},
    {"deep_norm": False, "layer_norm_first": True},
    {"relative_position_embedding": False, "gru_rel_pos": False, "deep_norm": False},
    {"gru_rel_pos": False},
    {"activation_fn": "glu"},
])
def test_variants_run(fbank, over):
    model = _model(_small(**over))
    with torch.no_grad():
        feats, _ = model(fbank[:1])
    assert feats.shape == (1, 96, 128) and torch.isfinite(feats).all()


def test_config_dict_round_trip_and_unknown_keys():
    cfg = BEATsConfig.base()
    assert BEATsConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.warns(UserWarning, match="not_a_field"):
        got = BEATsConfig.from_dict({**cfg.to_dict(), "not_a_field": 1})
    assert got == cfg
    # official defaults (beats/BEATs.py), except input_patch_size (-1 there, 16 in every checkpoint)
    d = BEATsConfig()
    assert (d.embed_dim, d.encoder_layers, d.encoder_embed_dim, d.encoder_ffn_embed_dim,
            d.encoder_attention_heads) == (512, 12, 768, 3072, 12)
    assert (d.num_buckets, d.max_distance, d.conv_pos, d.conv_pos_groups) == (320, 1280, 128, 16)
    assert not (d.deep_norm or d.layer_norm_first or d.relative_position_embedding or d.gru_rel_pos)
    assert (d.dropout, d.attention_dropout, d.activation_dropout, d.encoder_layerdrop) == (0.1, 0.1, 0.0, 0.0)


def test_bad_config_and_input_rejected():
    with pytest.raises(ValueError, match="deep_norm"):
        BEATs(_small(deep_norm=True, layer_norm_first=True))
    with pytest.raises(ValueError, match="input_patch_size"):
        BEATs(_small(input_patch_size=-1))
    model = _model()
    with pytest.raises(ValueError, match="frames"):
        model(torch.zeros(198, 128))
    with pytest.raises(ImemError, match="fine-tuned"):
        model.predict(torch.zeros(1, 32, 128))


# -------------------------------------------------------------------------------------- checkpoints


def _outputs(model, fb):
    with torch.no_grad():
        return model(fb)[0]


def test_checkpoint_round_trip_official_format(tmp_path, fbank):
    model = _model(_small(finetuned_model=True, predictor_class=5), seed=3)
    path = tmp_path / "beats_small.pt"
    torch.save({"cfg": model.cfg.to_dict(), "model": model.state_dict()}, path)
    loaded = load_beats(path)
    assert not loaded.training
    assert loaded.cfg == model.cfg
    assert torch.equal(_outputs(model, fbank), _outputs(loaded, fbank))
    with torch.no_grad():
        assert torch.equal(model.predict(fbank)[0], loaded.predict(fbank)[0])
    # save_beats writes the same layout
    other = tmp_path / "sub" / "again.pt"
    save_beats(loaded, other)
    assert set(torch.load(other, weights_only=True)) == {"cfg", "model"}
    assert torch.equal(_outputs(load_beats(other), fbank), _outputs(model, fbank))


def test_checkpoint_missing_key_and_wrong_shape(tmp_path):
    model = _model()
    sd = model.state_dict()
    cfg = model.cfg.to_dict()

    missing = dict(sd)
    del missing["encoder.layers.1.fc2.bias"]
    torch.save({"cfg": cfg, "model": missing}, tmp_path / "missing.pt")
    with pytest.raises(ImemError, match=r"missing key 'encoder\.layers\.1\.fc2\.bias'") as e:
        load_beats(tmp_path / "missing.pt")
    assert "\n" not in str(e.value) and "missing.pt" in str(e.value)

    wrong = dict(sd)
    wrong["encoder.layers.0.fc1.weight"] = torch.zeros(255, 128)
    torch.save({"cfg": cfg, "model": wrong}, tmp_path / "wrong.pt")
    with pytest.raises(ImemError, match=r"'encoder\.layers\.0\.fc1\.weight': checkpoint \(255, 128\) vs model "
                                        r"\(256, 128\)") as e:
        load_beats(tmp_path / "wrong.pt")
    assert "\n" not in str(e.value)

    extra = {**sd, "encoder.bogus": torch.zeros(1)}
    with pytest.raises(ImemError, match=r"unexpected key 'encoder\.bogus'"):
        load_state_dict_checked(model, extra)

    torch.save({"model": sd}, tmp_path / "nocfg.pt")
    with pytest.raises(ImemError, match="not a BEATs checkpoint"):
        load_beats(tmp_path / "nocfg.pt")


def test_missing_checkpoint_file_one_line(tmp_path):
    path = tmp_path / "models" / "BEATs_iter3_plus_AS2M.pt"
    with pytest.raises(ImemError) as e:
        load_beats(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"BEATs checkpoint not found: {path} (")
    assert "BEATs_iter3_plus_AS2M.pt" in msg and "nothing is downloaded" in msg


def test_unsafe_pickle_refused_with_one_line(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"cfg": argparse.Namespace(encoder_layers=2), "model": {}}, path)  # not a plain container
    with pytest.raises(ImemError, match="Unsupported global.*weights_only=False") as e:
        load_beats(path)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ImemError, match="cannot read BEATs checkpoint") as e:
        load_beats(path)
    assert "\n" not in str(e.value)


def test_weight_norm_matches_torch_and_accepts_new_key_names():
    torch.manual_seed(0)
    ours = WeightNormConv1d(32, kernel_size=8, groups=4, padding=4)
    ref = torch.nn.utils.parametrizations.weight_norm(
        torch.nn.Conv1d(32, 32, kernel_size=8, padding=4, groups=4), name="weight", dim=2)
    new_sd = ref.state_dict()
    assert set(new_sd) == {"bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
    assert tuple(new_sd["parametrizations.weight.original0"].shape) == (1, 1, 8)
    ours.load_state_dict(new_sd)  # renamed to weight_g / weight_v on load
    assert set(ours.state_dict()) == {"weight_g", "weight_v", "bias"}
    x = torch.randn(2, 32, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.weight, ref.weight)


def test_checkpoint_with_new_weight_norm_names_loads():
    model = _model()
    sd = dict(model.state_dict())
    sd["encoder.pos_conv.0.parametrizations.weight.original0"] = sd.pop("encoder.pos_conv.0.weight_g")
    sd["encoder.pos_conv.0.parametrizations.weight.original1"] = sd.pop("encoder.pos_conv.0.weight_v")
    other = _model(seed=1)
    load_state_dict_checked(other, sd)
    assert torch.equal(other.encoder.pos_conv[0].weight_v, model.encoder.pos_conv[0].weight_v)


# ------------------------------------------------------------------------------- relative positions


def test_relative_position_bucket_hand_values():
    # bidirectional: n = num_buckets // 2 = 160 per sign (positive offsets + 160), exact below n//2 = 80,
    # else 80 + int(log(d / 80) / log(max_distance / 80) * 80), capped at 159.
    rel = torch.tensor([0, -5, 5, -79, 79, -80, 80, -100, 100, -200, -800, 800, -10000, 10000])
    # max_distance 800: log(100/80)/log(10)*80 = 7.75 -> 87; log(200/80)/log(10)*80 = 31.8 -> 111;
    # d = 800 -> 80 + 80 = 160 -> capped 159
    assert relative_position_bucket(rel, 320, 800).tolist() == [
        0, 5, 165, 79, 239, 80, 240, 87, 247, 111, 159, 319, 159, 319]
    # max_distance 1280: log(1.25)/log(16)*80 = 6.44 -> 86; log(2.5)/log(16)*80 = 26.4 -> 106;
    # log(10)/log(16)*80 = 66.4 -> 146
    assert relative_position_bucket(rel, 320, 1280).tolist() == [
        0, 5, 165, 79, 239, 80, 240, 86, 246, 106, 146, 306, 159, 319]
    # symmetric structure and range on a full 96 x 96 grid
    pos = torch.arange(96)
    grid = relative_position_bucket(pos[None, :] - pos[:, None], 320, 800)
    assert grid.min() >= 0 and grid.max() < 320
    assert torch.equal(grid.diagonal(), torch.zeros(96, dtype=torch.long))


def test_compute_bias_and_gated_bias():
    model = _model()
    attn = model.encoder.layers[0].self_attn
    bias = attn.compute_bias(6, 6)
    assert bias.shape == (4, 6, 6)
    buckets = relative_position_bucket(torch.arange(6)[None, :] - torch.arange(6)[:, None], 320, 800)
    assert torch.equal(bias, attn.relative_attention_bias.weight[buckets].permute(2, 0, 1))

    q = torch.randn(3, 4, 6, 32)
    gated = attn.gated_position_bias(q, bias)
    assert gated.shape == (3, 4, 6, 6)
    with torch.no_grad():
        attn.grep_linear.weight.zero_()
        attn.grep_linear.bias.zero_()
        attn.grep_a.fill_(1.0)
        # gates sigmoid(0) = 0.5: 0.5 * (0.5 * 1 - 1) + 2 = 1.75
        torch.testing.assert_close(attn.gated_position_bias(q, bias), 1.75 * bias.expand(3, 4, 6, 6))


# ------------------------------------------------------------------------------------------ padding


def test_reduce_padding_mask_official_rule():
    frames = torch.zeros(1, 198, dtype=torch.bool)
    frames[0, 160:] = True  # last 38 frames padded: time patches 10 and 11 fully, i.e. tokens 80..95
    tokens = reduce_padding_mask(frames, 96)
    assert tokens.shape == (1, 96)
    assert not tokens[0, :80].any() and tokens[0, 80:].all()


def test_padded_frames_are_masked(fbank):
    model = _model()
    mask = torch.zeros(2, 198, dtype=torch.bool)
    mask[1, 160:] = True
    with torch.no_grad():
        feats, tok_mask = model(fbank, mask)
        assert tok_mask[1, 80:].all() and not tok_mask[1, :80].any() and not tok_mask[0].any()
        # whatever is in the padded frames does not reach the real tokens
        noisy = fbank.clone()
        noisy[1, 160:] = 5 * torch.randn(38, 128)
        feats_noisy, _ = model(noisy, mask)
        torch.testing.assert_close(feats_noisy[1, :80], feats[1, :80], rtol=0, atol=1e-6)
        torch.testing.assert_close(feats_noisy[0], feats[0], rtol=0, atol=1e-6)
        # and the real tokens equal those of the unpadded 160-frame input
        short, _ = model(fbank[1:, :160])
        assert short.shape == (1, 80, 128)
        torch.testing.assert_close(feats[1, :80], short[0], rtol=0, atol=1e-5)


def test_predict_averages_unpadded_tokens(fbank):
    model = _model(_small(finetuned_model=True, predictor_class=6))
    mask = torch.zeros(2, 198, dtype=torch.bool)
    mask[0, 160:] = True
    with torch.no_grad():
        probs, tok_mask = model.predict(fbank, mask)
        feats, _ = model(fbank, mask)
        logits = model.predictor(feats)
    assert probs.shape == (2, 6) and ((probs > 0) & (probs < 1)).all()
    expected = torch.sigmoid(torch.stack([logits[0, :80].mean(0), logits[1].mean(0)]))
    torch.testing.assert_close(probs, expected)


# ---------------------------------------------------------------------------- determinism, gradients


def test_eval_is_deterministic_and_train_uses_dropout(fbank):
    model = _model(_small(dropout=0.1, encoder_layerdrop=0.0))
    with torch.no_grad():
        a, b = model(fbank)[0], model(fbank)[0]
        assert torch.equal(a, b)
        model.train()
        c = model(fbank)[0]
    assert not torch.allclose(a, c)


def test_backward_gives_finite_gradients_everywhere(fbank):
    torch.manual_seed(0)
    model = BEATs(_small(encoder_layerdrop=0.0)).train()
    feats, _ = model(fbank)
    feats.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.encoder.layers[0].self_attn.relative_attention_bias.weight.grad.abs().sum() > 0
    assert model.encoder.layers[1].self_attn.grep_a.grad.abs().sum() > 0


def test_grad_multiply_scales_gradient_only():
    x = torch.ones(3, requires_grad=True)
    y = GradMultiply.apply(x, 0.6)
    assert torch.equal(y, x.detach())
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 0.6))


def test_deep_norm_constants():
    layer = BEATs(_small()).encoder.layers[0]
    assert math.isclose(layer.deep_norm_alpha, (2 * 2) ** 0.25)
    assert BEATs(_small(deep_norm=False)).encoder.layers[0].deep_norm_alpha == 1.0
