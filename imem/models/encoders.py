"""Encoders (thesis tables 3.2 and 3.3) and the head strategies that feed a sequence to the FC layer.

* CNN: torchvision ResNet (ResNet50 for images, 224x224x3 -> 2048; ResNet18 for music, the 193x87
  handcrafted matrix tiled to 3 channels -> 512), global-average pooled.
* Transformer: ViT for images via transformers' ``ViTModel`` ((197, 768) at 224/16 for ViT-B) and BEATs
  for music (:mod:`imem.models.beats`; (96, 768) for a 2-s clip with BEATs-base).

Head strategies after a transformer (``head``):
  ``flatten`` (thesis v1) the whole sequence flattened into the FC; the FC's input size is fixed by the
  sequence length, so another length is refused with a clear message;
  ``cls`` (thesis v2) the CLS token; BEATs has no CLS token, so for BEATs ``cls`` takes the mean of the
  tokens (documented substitute);
  ``mean`` mean-pooling over tokens (both encoders).
A CNN's pooled vector goes straight to the FC (``head: pool``).

``pretrained`` accepts (nothing is downloaded at run time):
  a torchvision weights name (``ResNet50_Weights.IMAGENET1K_V2``), resolved from the local torch hub
  cache (``$TORCH_HOME/hub/checkpoints/<file>``); a local checkpoint file (a state dict, or a dict with
  ``state_dict``/``model``; for BEATs the official ``{cfg, model}`` file); a local transformers model
  directory (ViT). A missing file is one error saying where to put it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from imem.errors import ImemError

INPUT_KINDS = {"resnet": None, "vit": "image", "beats": "fbank", "l3": None, "handcrafted_stats": "handcrafted"}


def _load_state(module: nn.Module, state: dict, where: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        key = missing[0] if missing else unexpected[0]
        raise ImemError(f"{where}: state dict does not fit the model: {'missing' if missing else 'unexpected'} "
                        f"key {key!r} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ImemError(f"{where}: key {k!r} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    module.load_state_dict(state)


def _read_checkpoint(path: Path) -> dict:
    from imem.checkpoints import safe_load

    obj = safe_load(path, "weights file")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def torchvision_weights_file(name: str) -> Path:
    """Local path of a torchvision weights enum's file (``ResNet50_Weights.IMAGENET1K_V2``)."""
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ImemError(f"pretrained: {name!r} is neither a file nor a torchvision weights name") from exc
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    path = directory / Path(weights.url).name
    if not path.is_file():
        raise ImemError(f"pretrained weights {name}: {path} not found; nothing is downloaded at run time: copy "
                        f"{path.name} ({weights.url}) into {directory} (or set TORCH_HOME)")
    return path


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier: (B, 3, H, W) -> (B, C) pooled features."""

    def __init__(self, arch: str = "resnet50", pretrained: str | None = None):
        super().__init__()
        import torchvision

        if arch not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ImemError(f"params: resnet arch {arch!r} is not one of resnet18, resnet34, resnet50, resnet101")
        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            p = Path(pretrained)
            path = p if p.is_file() else torchvision_weights_file(str(pretrained))
            _load_state(net, _read_checkpoint(path), str(path))
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.has_cls = False
        self.seq_len = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViTBackbone(nn.Module):
    """transformers ViTModel: (B, 3, H, W) -> last hidden state (B, 1 + N, D), CLS first."""

    def __init__(self, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 image_size=224, patch_size=16, pretrained: str | None = None):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        if pretrained:
            p = Path(pretrained)
            if not p.is_dir():
                raise ImemError(f"pretrained ViT: directory {p} not found; put a transformers ViT model directory "
                                "(config.json + weights) there; nothing is downloaded at run time")
            self.vit = ViTModel.from_pretrained(str(p), local_files_only=True, add_pooling_layer=False)
        else:
            cfg = ViTConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                            num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                            image_size=image_size, patch_size=patch_size)
            self.vit = ViTModel(cfg, add_pooling_layer=False)
        c = self.vit.config
        self.out_dim = c.hidden_size
        self.seq_len = 1 + (c.image_size // c.patch_size) ** 2
        self.has_cls = True
        self.image_size = c.image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).last_hidden_state


class BEATsBackbone(nn.Module):
    """imem's BEATs: fbank (B, T, 128) -> (B, N, D) tokens (N = 96 for a 2-s clip)."""

    def __init__(self, size: str = "small", pretrained: str | None = None, clip_seconds: float = 2.0, **overrides):
        super().__init__()
        from imem.models.beats import BEATs, BEATsConfig, load_beats

        if pretrained:
            self.beats = load_beats(pretrained)
        else:
            if size not in ("small", "base"):
                raise ImemError(f"params: beats size {size!r} is not one of: small, base")
            unknown = [k for k in overrides if not hasattr(BEATsConfig(), k)]
            if unknown:
                raise ImemError(f"params: unknown BEATs config key {unknown[0]!r}")
            # base: the released iter3/iter3+ checkpoints' settings; small: the same code path, small sizes
            cfg = BEATsConfig.small(**overrides) if size == "small" else BEATsConfig.base(**overrides)
            self.beats = BEATs(cfg)
        self.out_dim = self.beats.cfg.encoder_embed_dim
        frames = int(round(clip_seconds * 100)) - 2  # Kaldi fbank, 25 ms windows every 10 ms, no padding
        self.seq_len = (frames // 16) * (128 // 16)
        self.has_cls = False

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.beats(fbank)[0]


class L3Subnetwork(nn.Module):
    """A subnetwork of L3-Net (Arandjelovic & Zisserman, ICCV 2017, fig. 2), trained from scratch: 4 blocks of
    [conv3x3-BN-ReLU] x 2 + 2x2 max-pool with ``width`` x (1, 2, 4, 8) channels, then a global max-pool.
    ``modality: vision`` takes (B, 3, H, W) images (resized to ``image_size``); ``audio`` takes (B, 1, F, T)
    log-mel spectrograms (:func:`l3_log_mel`). The paper uses width 64, 224-px frames and 257 x 199
    log-spectrograms; the defaults here are smaller so that end-to-end training fits 2 CPU cores."""

    def __init__(self, modality: str = "vision", width: int = 8, image_size: int = 48, n_mels: int = 64,
                 hop_ms: float = 20.0):
        super().__init__()
        if modality not in ("vision", "audio"):
            raise ImemError(f"params: l3 encoder modality {modality!r} is not one of: vision, audio")
        if int(width) < 1:
            raise ImemError(f"params: l3 encoder width must be >= 1, got {width}")
        self.modality, self.image_size, self.n_mels, self.hop_ms = modality, int(image_size), int(n_mels), float(hop_ms)
        layers: list[nn.Module] = []
        prev = 3 if modality == "vision" else 1
        for mult in (1, 2, 4, 8):
            ch = int(width) * mult
            for _ in range(2):
                layers += [nn.Conv2d(prev, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
                prev = ch
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.net = nn.Sequential(*layers)
        self.out_dim = prev
        self.has_cls = False
        self.seq_len = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.net(x), dim=(2, 3))


def l3_log_mel(waves_16k: torch.Tensor, n_mels: int = 64, hop_ms: float = 20.0) -> torch.Tensor:
    """(n, samples) 16-kHz audio -> (n, 1, n_mels, frames) log-mel spectrogram (L3-Net's audio input;
    torchaudio's MelSpectrogram, 40-ms windows, log(x + 1e-6))."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=640, win_length=640,
                                               hop_length=int(round(16000 * hop_ms / 1000)), n_mels=int(n_mels))
    return torch.log(mel(waves_16k) + 1e-6).unsqueeze(1)


class HandcraftedStats(nn.Module):
    """ACP-Net's audio features (Verma et al., ICASSP 2019): the handcrafted clip matrix (MFCC, chroma,
    spectral contrast, tonnetz, mel; 193 rows x frames) summarised by its mean and standard deviation over
    time -> 386 values. No parameters: the FC layers after it learn everything."""

    def __init__(self, rows: int = 193):
        super().__init__()
        self.out_dim = 2 * int(rows)
        self.has_cls = False
        self.seq_len = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # the (n, 3, 193, T) tiled CNN input: one channel is the matrix
            x = x[:, 0]
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=False)], dim=1)


def build_backbone(spec: dict, clip_seconds: float = 2.0) -> nn.Module:
    spec = dict(spec)
    spec.pop("name", None)  # the encoder's name under train.encoders, kept in configs for tracking
    kind = spec.pop("type", None)
    if kind == "resnet":
        return ResNetBackbone(spec.pop("arch", "resnet50"), spec.pop("pretrained", None), **_no_more(spec, kind))
    if kind == "vit":
        return ViTBackbone(**spec)
    if kind == "beats":
        return BEATsBackbone(clip_seconds=clip_seconds, **spec)
    if kind == "l3":
        unknown = sorted(set(spec) - {"modality", "width", "image_size", "n_mels", "hop_ms"})
        if unknown:
            raise ImemError(f"params: unknown key {unknown[0]!r} for an l3 encoder")
        return L3Subnetwork(**spec)
    if kind == "handcrafted_stats":
        return HandcraftedStats(**_no_more(spec, kind))
    raise ImemError(f"params: encoder type {kind!r} is not one of: resnet, vit, beats, l3, handcrafted_stats")


def _no_more(spec: dict, kind: str) -> dict:
    if spec:
        raise ImemError(f"params: unknown key {next(iter(spec))!r} for a {kind} encoder")
    return {}


# The head strategies, listed once: ``pool`` for the encoders whose output is already one vector, the
# thesis' v1 (flatten) and v2 (cls) and the token mean for the encoders that output a sequence.
SEQUENCE_ENCODERS = ("vit", "beats")
SEQUENCE_HEADS = ("flatten", "cls", "mean")


class Head(nn.Module):
    """Sequence (or pooled vector) -> the shared embedding space (an FC to ``embed_dim``)."""

    STRATEGIES = ("pool", *SEQUENCE_HEADS)

    def __init__(self, backbone: nn.Module, strategy: str, embed_dim: int = 512, norm: str = "batchnorm"):
        super().__init__()
        if norm not in ("batchnorm", "none"):
            raise ImemError(f"params: head_norm {norm!r} is not one of: batchnorm, none")
        if strategy not in self.STRATEGIES:
            raise ImemError(f"params: head {strategy!r} is not one of: {', '.join(self.STRATEGIES)}")
        is_seq = backbone.seq_len is not None
        if is_seq and strategy == "pool":
            raise ImemError("params: head 'pool' is for CNN encoders; a transformer needs flatten, cls or mean")
        if not is_seq and strategy != "pool":
            raise ImemError(f"params: head {strategy!r} needs a transformer encoder; a CNN's output is pooled (use pool)")
        self.strategy = strategy
        self.seq_len = backbone.seq_len
        self.has_cls = backbone.has_cls
        in_dim = backbone.out_dim * (backbone.seq_len if strategy == "flatten" else 1)
        # BatchNorm1d on the FC input standardises frozen features whose scale is arbitrary (a randomly
        # initialised ResNet50 in eval mode outputs |h| ~ 10-200); ``none`` is the paper's plain FC.
        self.norm = nn.BatchNorm1d(in_dim) if norm == "batchnorm" else nn.Identity()
        self.fc = nn.Linear(in_dim, embed_dim)

    @property
    def reduction(self) -> str:
        """The parameter-free first step of the head: ``none`` (pool, flatten: the FC reads every value),
        ``cls`` (the first token) or ``mean`` (over the tokens; also ``cls`` for an encoder without a CLS token)."""
        if self.strategy in ("pool", "flatten"):
            return "none"
        return "cls" if self.strategy == "cls" and self.has_cls else "mean"

    def reduce(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` after :attr:`reduction`. A frozen backbone's cache stores this rather than the whole sequence
        (:func:`imem.training.backbone_cache`): a CLS head reads one token of 197."""
        if self.reduction == "cls":
            return h[:, 0]
        if self.reduction == "mean":
            return h.mean(dim=1)
        return h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.strategy == "pool":
            z = h
        elif h.dim() == 2:  # already reduced: the frozen-backbone cache's rows (see ``reduce``)
            if h.shape[1] != self.fc.in_features:
                raise ImemError(f"head {self.strategy} expects reduced inputs of width {self.fc.in_features}, "
                                f"got {h.shape[1]}")
            z = h
        elif self.strategy == "flatten":
            if h.shape[1] != self.seq_len:
                raise ImemError(f"head v1 (flatten) was built for sequences of {self.seq_len} tokens, got {h.shape[1]}: "
                                "use the same input length as in training, or head cls/mean")
            z = h.flatten(1)
        else:  # contiguous, as the cache's rows are: the FC then gives the same bits on either path
            z = self.reduce(h).contiguous()
        return self.fc(self.norm(z))
