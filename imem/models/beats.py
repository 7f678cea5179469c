"""BEATs audio encoder (Chen et al. 2022, "BEATs: Audio Pre-Training with Acoustic Tokenizers").

An independent re-implementation of the model in ``microsoft/unilm``, folder ``beats/`` (``BEATs.py``,
``backbone.py``, ``modules.py``), written so that an official checkpoint (e.g. ``BEATs_iter3_plus_AS2M.pt``:
a ``torch.save``d dict ``{"cfg": dict of BEATsConfig fields, "model": state dict}``) loads AS IS with a
strict ``load_state_dict``: same module names, parameter names and shapes.

Input is the normalised 128-bin fbank made by :func:`imem.features.store.beats_fbank` (the official
``BEATs.preprocess``), shape (B, T, 128). The path is::

    fbank (B, T, 128) -> (B, 1, T, 128) -> patch_embedding (Conv2d 1->embed_dim, 16x16, stride 16)
    -> (B, embed_dim, T//16, 8) -> (B, N = T//16 * 8, embed_dim) -> layer_norm -> post_extract_proj
    -> dropout_input -> encoder -> (B, N, encoder_embed_dim)

The encoder (fairseq/WavLM style): convolutional positional embedding ``encoder.pos_conv`` (weight-normed
grouped Conv1d, SamePad, GELU) added to the input, ``encoder.layer_norm`` (before the layers when
post-norm, after them when ``layer_norm_first``), then ``encoder_layers`` transformer layers with
bucketed relative position bias (one ``relative_attention_bias`` embedding shared by every layer) and
WavLM's gated relative position bias (``grep_linear``, ``grep_a``), DeepNorm residual scaling when
``deep_norm``. A 2-s clip (198 fbank frames) gives 12 x 8 = 96 tokens.

Differences from the official code, none of which changes a parameter or an output in eval mode:

* ``forward``/``extract_features`` always return the encoder features; class probabilities of a
  fine-tuned checkpoint come from :meth:`BEATs.predict` (the official ``extract_features`` returns
  probabilities instead of features when ``finetuned_model``).
* ``padding_mask`` is given at fbank-frame level (B, T) (True = padded) and reduced to tokens with the
  official rule; the returned mask is all False (not None) when none is given.
* Layer drop draws from torch's RNG (official: numpy's).
* ``BEATsConfig.input_patch_size`` defaults to 16 (official default -1, which every released checkpoint
  overrides with 16).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imem.errors import ImemError

CHECKPOINT_HINT = ("download BEATs_iter3_plus_AS2M.pt from the BEATs release page "
                   "(https://github.com/microsoft/unilm/tree/master/beats) and put it there; "
                   "nothing is downloaded at run time")


# --------------------------------------------------------------------------------------------- config


@dataclass
class BEATsConfig:
    """The official ``BEATsConfig`` fields and defaults (``beats/BEATs.py``)."""

    input_patch_size: int = 16  # patch size of the patch embedding (official default -1)
    embed_dim: int = 512  # patch embedding dimension
    conv_bias: bool = False  # bias in the patch embedding conv

    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"

    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False

    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0

    conv_pos: int = 128  # kernel size of the convolutional positional embedding
    conv_pos_groups: int = 16

    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False

    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BEATsConfig:
        """Build from a checkpoint's ``cfg`` dict; unknown keys are ignored with a warning."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"BEATsConfig: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, as stored under ``cfg`` in an official checkpoint."""
        return asdict(self)

    @classmethod
    def base(cls, **overrides: Any) -> BEATsConfig:
        """BEATs-base with the architecture flags of the released iter3 / iter3+ checkpoints.

        Post-norm with DeepNorm, relative position buckets (320 buckets, max distance 800) with the gated
        bias, layer drop 0.05 and layer-wise gradient decay 0.6. Only the flags decide parameter names and
        shapes; a real checkpoint's ``cfg`` always wins when loading with :func:`load_beats`.
        """
        cfg = cls(relative_position_embedding=True, gru_rel_pos=True, deep_norm=True,
                  layer_norm_first=False, max_distance=800, encoder_layerdrop=0.05,
                  layer_wise_gradient_decay_ratio=0.6)
        return replace(cfg, **overrides)

    @classmethod
    def small(cls, **overrides: Any) -> BEATsConfig:
        """:meth:`base` with sizes for CPU training on two cores: 2 layers, 128-d, 4 heads, 256 ffn,
        64-d patches (about 0.43 M parameters). Same code path, same flags."""
        cfg = replace(cls.base(), encoder_layers=2, encoder_embed_dim=128, encoder_attention_heads=4,
                      encoder_ffn_embed_dim=256, embed_dim=64)
        return replace(cfg, **overrides)


# -------------------------------------------------------------------------------------------- modules


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward (layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


class SamePad(nn.Module):
    """Drops the extra last frame an even kernel with padding k//2 produces."""

    def __init__(self, kernel_size: int, causal: bool = False) -> None:
        super().__init__()
        self.remove = kernel_size - 1 if causal else (1 if kernel_size % 2 == 0 else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.remove] if self.remove > 0 else x


class WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation along ``dim=2`` stored as ``weight_g`` (1, 1, K) and ``weight_v``
    (out, in/groups, K), the key names ``torch.nn.utils.weight_norm(conv, name="weight", dim=2)`` gives
    and the official checkpoints hold. ``weight = weight_v * weight_g / ||weight_v||`` where the norm is
    taken over dims 0 and 1. State dicts written by the newer parametrization API
    (``parametrizations.weight.original0/1``) are renamed on load."""

    def __init__(self, channels: int, kernel_size: int, groups: int, padding: int) -> None:
        super().__init__()
        self.groups, self.padding = groups, padding
        std = math.sqrt(4.0 / (kernel_size * channels))  # official init (dropout 0)
        v = torch.randn(channels, channels // groups, kernel_size) * std
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        self.weight_v = nn.Parameter(v)
        self.bias = nn.Parameter(torch.zeros(channels))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for new, old in (("original0", "weight_g"), ("original1", "weight_v")):
            key = f"{prefix}parametrizations.weight.{new}"
            if key in state_dict and prefix + old not in state_dict:
                state_dict[prefix + old] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GLULinear(nn.Module):
    """``activation_fn="glu"``: Linear to 2 x out, first half times swish(second half)."""

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.linear = nn.Linear(input_dim, output_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.linear(x).split(self.output_dim, dim=-1)
        return a * (b * torch.sigmoid(b))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float()).type_as(x)


def _gelu_accurate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


_ACTIVATIONS = {"relu": F.relu, "gelu": _gelu, "gelu_accurate": _gelu_accurate, "gelu_fast": _gelu_accurate,
                "tanh": torch.tanh, "linear": lambda x: x, "glu": lambda x: x}


def relative_position_bucket(relative_positions: torch.Tensor, num_buckets: int, max_distance: int,
                             bidirectional: bool = True) -> torch.Tensor:
    """T5-style buckets of ``key - query`` positions, as the official ``_relative_positions_bucket``.

    Bidirectional: half the buckets for positive offsets (offset by ``num_buckets // 2``); within a half
    of ``n`` buckets, distances below ``n // 2`` get their own bucket, larger ones a logarithmic bucket
    ``n//2 + int(log(d / (n//2)) / log(max_distance / (n//2)) * (n - n//2))`` capped at ``n - 1``.
    """
    buckets = torch.zeros_like(relative_positions, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_positions > 0).long() * num_buckets
        distance = relative_positions.abs()
    else:
        distance = -torch.clamp(relative_positions, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class MultiheadAttention(nn.Module):
    """Self-attention with optional bucketed relative position bias and WavLM's gated bias."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 has_relative_attention_bias: bool = False, num_buckets: int = 32, max_distance: int = 128,
                 gru_rel_pos: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.dropout_module = nn.Dropout(dropout)
        self.has_relative_attention_bias = has_relative_attention_bias
        self.num_buckets, self.max_distance = num_buckets, max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def compute_bias(self, query_length: int, key_length: int) -> torch.Tensor:
        """Relative position bias (heads, query_length, key_length)."""
        device = self.relative_attention_bias.weight.device
        rel = (torch.arange(key_length, device=device)[None, :]
               - torch.arange(query_length, device=device)[:, None])
        buckets = relative_position_bucket(rel, self.num_buckets, self.max_distance, bidirectional=True)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def gated_position_bias(self, query: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        """Gated relative position bias. ``query``: un-scaled projected queries (B, H, T, head_dim);
        ``position_bias``: (H, T, S) or (B, H, T, S). Returns (B, H, T, S)."""
        b, h, t, _ = query.shape
        gates = torch.sigmoid(self.grep_linear(query).view(b, h, t, 2, 4).sum(-1))
        gate_a, gate_b = gates.chunk(2, dim=-1)  # (B, H, T, 1) each
        return (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * position_bias

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C); key_padding_mask (B, T) True = padded; position_bias (H, T, T) from an earlier
        layer or None. Returns (output (B, T, C), the un-gated position bias for the next layer)."""
        bsz, tgt_len, _ = x.shape
        if self.has_relative_attention_bias and position_bias is None:
            position_bias = self.compute_bias(tgt_len, tgt_len)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)

        q_raw = heads(self.q_proj(x))
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        # The official code scales q by scaling / alpha and multiplies (scores - max) by alpha (alpha = 32)
        # for fp16 headroom; identical up to rounding to softmax(q k^T * scaling + bias).
        alpha = 32.0
        scores = torch.matmul(q_raw * (self.scaling / alpha), k.transpose(-1, -2))
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * alpha
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :].bool(), float("-inf"))
        if position_bias is not None:
            bias = self.gated_position_bias(q_raw, position_bias) if self.gru_rel_pos else position_bias
            scores = scores + bias
        probs = self.dropout_module(F.softmax(scores, dim=-1).type_as(scores))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        return self.out_proj(out), position_bias


class TransformerSentenceEncoderLayer(nn.Module):
    """Post-norm (optionally DeepNorm-scaled) or pre-norm transformer layer."""

    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        if cfg.activation_fn not in _ACTIVATIONS:
            raise ValueError(f"activation_fn {cfg.activation_fn!r} not supported")
        self.activation_name = cfg.activation_fn
        self.activation_fn = _ACTIVATIONS[cfg.activation_fn]
        self.self_attn = MultiheadAttention(
            d, cfg.encoder_attention_heads, dropout=cfg.attention_dropout,
            has_relative_attention_bias=has_relative_attention_bias, num_buckets=cfg.num_buckets,
            max_distance=cfg.max_distance, gru_rel_pos=cfg.gru_rel_pos)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.activation_dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn_layer_norm = nn.LayerNorm(d)
        if cfg.activation_fn == "glu":
            self.fc1: nn.Module = GLULinear(d, cfg.encoder_ffn_embed_dim)
        else:
            self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.deep_norm = cfg.deep_norm
        self.deep_norm_alpha = math.pow(2 * cfg.encoder_layers, 1 / 4) if cfg.deep_norm else 1.0

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation_fn(self.fc1(x))
        return self.dropout3(self.fc2(self.dropout2(x)))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                pos_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.layer_norm_first:
            h, pos_bias = self.self_attn(self.self_attn_layer_norm(x), padding_mask, pos_bias)
            x = x + self.dropout1(h)
            x = x + self._ffn(self.final_layer_norm(x))
        else:
            h, pos_bias = self.self_attn(x, padding_mask, pos_bias)
            x = self.self_attn_layer_norm(x * self.deep_norm_alpha + self.dropout1(h))
            x = self.final_layer_norm(x * self.deep_norm_alpha + self._ffn(x))
        return x, pos_bias


def _init_bert_params(module: nn.Module) -> None:
    """fairseq's BERT init: Linear/Embedding weights N(0, 0.02), biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


class TransformerEncoder(nn.Module):
    """``encoder``: pos_conv, layers, layer_norm."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        self.dropout = cfg.dropout
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(d, cfg.conv_pos, cfg.conv_pos_groups, padding=cfg.conv_pos // 2),
            SamePad(cfg.conv_pos), nn.GELU())
        self.relative_position_embedding = cfg.relative_position_embedding
        self.layers = nn.ModuleList(
            TransformerSentenceEncoderLayer(cfg, cfg.relative_position_embedding)
            for _ in range(cfg.encoder_layers))
        if cfg.relative_position_embedding:
            # One embedding shared by every layer, registered under each layer's name like the official
            # code, so the checkpoint holds encoder.layers.<i>.self_attn.relative_attention_bias.weight
            # for every i (all equal).
            shared = self.layers[0].self_attn.relative_attention_bias
            for layer in self.layers[1:]:
                del layer.self_attn.relative_attention_bias
                layer.self_attn.relative_attention_bias = shared
        self.layer_norm_first = cfg.layer_norm_first
        self.layer_norm = nn.LayerNorm(d)
        self.layerdrop = cfg.encoder_layerdrop
        self.apply(_init_bert_params)
        if cfg.deep_norm:
            beta = math.pow(8 * cfg.encoder_layers, -1 / 4)
            for layer in self.layers:
                attn = layer.self_attn
                for lin, gain in ((attn.k_proj, 1.0), (attn.v_proj, beta), (attn.q_proj, 1.0),
                                  (attn.out_proj, beta), (layer.fc1, beta), (layer.fc2, beta)):
                    weight = lin.linear.weight if isinstance(lin, GLULinear) else lin.weight
                    nn.init.xavier_normal_(weight, gain=gain)
        self.layer_wise_gradient_decay_ratio = cfg.layer_wise_gradient_decay_ratio

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                layer: int | None = None) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C). ``layer``: stop after that layer (0-based) and return its output."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, p=self.dropout, training=self.training)
        pos_bias = None
        for i, block in enumerate(self.layers):
            if self.layer_wise_gradient_decay_ratio != 1.0:
                x = GradMultiply.apply(x, self.layer_wise_gradient_decay_ratio)
            if not self.training or self.layerdrop <= 0 or float(torch.rand(())) > self.layerdrop:
                x, pos_bias = block(x, padding_mask, pos_bias)
            if layer is not None and i == layer:
                return x
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


def reduce_padding_mask(padding_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The official ``forward_padding_mask``: (B, L) -> (B, length), dropping the last ``L % length``
    entries and marking a position padded when all of its ``L // length`` consecutive entries are.

    Applied once to a frame mask it gives the token mask; a sample-level mask needs two steps (samples to
    fbank frames, then frames to tokens), as the official code does.
    """
    extra = padding_mask.size(1) % length
    if extra > 0:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.view(padding_mask.size(0), length, -1).all(-1)


class BEATs(nn.Module):
    """The BEATs encoder. ``forward(fbank, padding_mask=None) -> (features (B, N, D), padding_mask (B, N))``
    with N = (T // 16) * (128 // 16) for patch size 16."""

    def __init__(self, cfg: BEATsConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else BEATsConfig()
        if cfg.input_patch_size <= 0:
            raise ValueError(f"BEATsConfig.input_patch_size must be positive, got {cfg.input_patch_size}")
        if cfg.deep_norm and cfg.layer_norm_first:
            raise ValueError("BEATsConfig: deep_norm and layer_norm_first cannot both be set")
        self.cfg = cfg
        self.embed = cfg.embed_dim
        self.post_extract_proj = (nn.Linear(self.embed, cfg.encoder_embed_dim)
                                  if self.embed != cfg.encoder_embed_dim else None)
        self.input_patch_size = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, self.embed, kernel_size=self.input_patch_size,
                                         stride=self.input_patch_size, bias=cfg.conv_bias)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = TransformerEncoder(cfg)
        self.layer_norm = nn.LayerNorm(self.embed)
        if cfg.finetuned_model:
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor: nn.Linear | None = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)
        else:
            self.predictor = None

    @property
    def output_dim(self) -> int:
        return self.cfg.encoder_embed_dim

    def num_tokens(self, frames: int, mel_bins: int = 128) -> int:
        """Tokens for an fbank of ``frames`` x ``mel_bins`` (96 for a 2-s clip)."""
        p = self.input_patch_size
        return (frames // p) * (mel_bins // p)

    def extract_features(self, fbank: torch.Tensor, padding_mask: torch.Tensor | None = None,
                         layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fbank (B, T, 128) normalised as :func:`imem.features.store.beats_fbank`; padding_mask (B, T)
        bool, True = padded frame. Returns (features (B, N, D), token padding mask (B, N)). ``layer``:
        output of that encoder layer (0-based) instead of the last."""
        if fbank.dim() != 3:
            raise ValueError(f"BEATs expects fbank of shape (batch, frames, mel bins), got {tuple(fbank.shape)}")
        if fbank.size(1) < self.input_patch_size or fbank.size(2) < self.input_patch_size:
            raise ValueError(f"fbank {tuple(fbank.shape)} is smaller than one {self.input_patch_size}-patch")
        x = self.patch_embedding(fbank.unsqueeze(1))
        x = x.reshape(x.size(0), x.size(1), -1).transpose(1, 2)
        x = self.layer_norm(x)
        if padding_mask is not None:
            padding_mask = reduce_padding_mask(padding_mask.bool(), x.size(1))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = self.dropout_input(x)
        x = self.encoder(x, padding_mask=padding_mask, layer=layer)
        if padding_mask is None:
            padding_mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, padding_mask

    def forward(self, fbank: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.extract_features(fbank, padding_mask)

    def predict(self, fbank: torch.Tensor, padding_mask: torch.Tensor | None = None,
                return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine-tuned checkpoints only: per-clip class probabilities (B, predictor_class) as the official
        code computes them (predictor on every token, mean over non-padded tokens, sigmoid), and the token
        padding mask. ``return_logits``: the mean logits instead of the probabilities."""
        if self.predictor is None:
            raise ImemError("BEATs.predict needs a fine-tuned checkpoint (cfg finetuned_model=True)")
        x, mask = self.extract_features(fbank, padding_mask)
        logits = self.predictor(self.predictor_dropout(x))
        keep = (~mask).unsqueeze(-1).to(logits.dtype)
        logits = (logits * keep).sum(1) / keep.sum(1)
        return (logits if return_logits else torch.sigmoid(logits)), mask


# ---------------------------------------------------------------------------------------- checkpoints


def _legacy_key(key: str) -> str:
    """``...parametrizations.weight.original0/1`` (newer torch weight norm) -> ``...weight_g/_v``."""
    for new, old in (("parametrizations.weight.original0", "weight_g"),
                     ("parametrizations.weight.original1", "weight_v")):
        if key.endswith(new):
            return key[: -len(new)] + old
    return key


def _fit_error(model: nn.Module, state: dict[str, Any], where: str) -> str | None:
    """One line naming the first missing key, unexpected key and shape mismatch, or None if it fits."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) if hasattr(v, "shape") else None for k, v in state.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and given[k] != expected[k]]
    parts = []
    for label, keys in (("missing key", missing), ("unexpected key", unexpected)):
        if keys:
            more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
            parts.append(f"{label} '{keys[0]}'{more}")
    if wrong:
        k = wrong[0]
        more = f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""
        parts.append(f"shape mismatch for '{k}': checkpoint {given[k]} vs model {expected[k]}{more}")
    if not parts:
        return None
    return f"BEATs checkpoint {where} does not fit the model built from its cfg: " + "; ".join(parts)


def load_state_dict_checked(model: BEATs, state: dict[str, Any], where: str = "state dict") -> None:
    """Strict ``load_state_dict`` that raises :class:`ImemError` with one line naming the first missing or
    unexpected key and shape mismatch. Newer-torch weight-norm key names are accepted."""
    state = {_legacy_key(k): v for k, v in state.items()}
    err = _fit_error(model, state, where)
    if err is not None:
        raise ImemError(err)
    model.load_state_dict(state, strict=True)


def beats_checkpoint(model: BEATs) -> dict[str, Any]:
    """``{"cfg": dict, "model": state dict}``, the official checkpoint layout."""
    return {"cfg": model.cfg.to_dict(), "model": model.state_dict()}


def save_beats(model: BEATs, path: str | Path) -> Path:
    """Write ``model`` as an official-format checkpoint that :func:`load_beats` (and the official code)
    reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(beats_checkpoint(model), path)
    return path


def _load_failure(e: Exception, weights_only: bool) -> str:
    """The telling line of a ``torch.load`` failure, with the way out when ``weights_only`` refused it."""
    from imem.checkpoints import load_failure

    line = load_failure(e)
    if weights_only:
        line += " (weights_only=True; if the file is from a trusted source, retry with weights_only=False)"
    return line


def load_beats(path: str | Path, map_location: str | torch.device = "cpu", *,
               weights_only: bool = True) -> BEATs:
    """Load an official BEATs checkpoint (``{"cfg": ..., "model": ...}``) strictly; returns the model in
    eval mode.

    ``weights_only=True`` (the default) unpickles only tensors and plain containers, which is all an
    official checkpoint holds (``cfg`` is a plain dict of numbers, strings and booleans, ``model`` an
    OrderedDict of tensors; the fine-tuned ones add a plain ``label_dict``). Should a file need more, the
    error says so; pass ``weights_only=False`` only for a file from a trusted source, since full unpickling
    can run arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise ImemError(f"BEATs checkpoint not found: {path} ({CHECKPOINT_HINT})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # any unpickling failure becomes one clear line
        raise ImemError(f"cannot read BEATs checkpoint {path}: {_load_failure(e, weights_only)}") from e
    if not isinstance(ckpt, dict) or "cfg" not in ckpt or "model" not in ckpt:
        found = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ImemError(f"{path} is not a BEATs checkpoint: expected a dict with keys 'cfg' and 'model', "
                        f"found {found}")
    cfg = ckpt["cfg"]
    if not isinstance(cfg, dict):
        cfg = dict(vars(cfg))
    model = BEATs(BEATsConfig.from_dict(cfg))
    load_state_dict_checked(model, ckpt["model"], str(path))
    return model.eval()
