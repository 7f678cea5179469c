"""The CDCML / thesis losses (Zhao et al., ACM MM 2020, eqs. 1-8; thesis eqs. 3.2-3.10), as each paper writes them.

Equations (CDCML numbering; the thesis' in brackets): CFR eq. 2 (3.2-3.3), CFM eq. 3 (3.4), SFR eqs. 4-5
(3.5-3.6), similarity MSE eq. 6 (3.7), VA MSE eq. 7 (3.8-3.9), total eq. 8 (first-batch normalised: 3.10).

Reductions (``reduction``). CDCML's eqs. 2-5 are SUMS over the batch's anchors (``sum``); the thesis replaced
them by means because the sums exploded ("values exceeding 4000", thesis section 5; eq. 3.3) (``mean``). Eqs. 6-7
are means in both. Each variant follows its own paper (params.yaml).

Neighbours. The papers draw, per anchor, random neighbours ("we randomly choose two examples from another
modality at one time", CDCML 5.1.1): for CFR the anchor's own pair partner M_i and one random M_j (j != i); for SFR
two random neighbours j != k of the same modality. imem takes the expectation over that random choice in the
batch: every other batch element is a neighbour and the anchor's term is the mean over them (same expected
loss, no sampling noise). The anchor count is the batch size B either way, so ``sum`` equals B x ``mean``.

Distances. ``D`` is the squared Euclidean distance, as CDCML states (the thesis writes "Euclidean"); the
log-ratio reference code (Kim et al., CVPR 2019) uses the plain distance. A log-ratio compares *ratios* of
embedding distances with ratios of label distances, so the same ``D`` is applied to BOTH sides: squaring both
sides only multiplies the loss by 4, squaring one side would change the targets. ``distance: euclidean`` switches
both sides to the plain distance (embedding side ``sqrt(sum (a - b)^2 + 1e-4 / dim)`` as in the reference, a
finite gradient at 0). Logs: ``log(x + 1e-6)`` on both sides (the reference's guard).

CFR's target (``cfr``). Eq. 2 as printed compares log D(f_Ii, f_Mi) / D(f_Ii, f_Mj) with log S(I_i, M_i) /
S(I_i, M_j). S is a SIMILARITY (eq. 1: exp(-d / sigma)), so that target asks the more similar partner to lie
FURTHER away: log S_ii - log S_ij = (d_ij - d_ii) / sigma > 0 when M_i is the closer in VA, and the loss is
minimised by D_ii > D_ij. ``cfr: literal`` implements it exactly so (docs/training.md derives it and measures
what it learns: similar pairs pushed apart). The default ``cfr: pair`` keeps eq. 2's anchor, partner and random
neighbour but takes the log-ratio of the label DISTANCES, D(y_Ii, y_Mi) / D(y_Ii, y_Mj), i.e. of -log S up to the
squaring: what the paper's prose asks ("enforces the distance ratios in the cross-modal matching space to be
preserved", section 1; "inspired by log-ratio loss [31]"). ``cfr: dense`` is imem's earlier form (Kim et al.'s
dense log-ratio: every neighbour PAIR j < k of the other modality, not the partner), kept as a named option.

CFM (``cfm``). Eq. 3 (thesis 3.4) is a hinge on every pair's distance, ``[||f_Ii - f_Mi||_2 - alpha]_+``: pairs
further apart than alpha are pulled in, whatever their S (``cfm: hinge``, the default). ``cfm: contrastive``
(``S d^2 + (1 - S) [alpha - d]_+^2``) is imem's earlier form, NOT the paper's, kept as a named option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imem.errors import ImemError

LOG_EPS = 1e-6
LOSS_NAMES = ("cfr", "cfm", "sfr_image", "sfr_music", "sim", "va_image", "va_music")
CFR_FORMS = ("pair", "literal", "dense")
CFM_FORMS = ("hinge", "contrastive")
REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class LossSettings:
    """How the feature losses are computed (train params ``cfr``, ``cfm``, ``reduction``, ``distance``, ``margin``)."""
    margin: float = 15.0
    cfr: str = "pair"
    cfm: str = "hinge"
    reduction: str = "sum"
    squared: bool = True

    def __post_init__(self):
        for key, value, allowed in (("cfr", self.cfr, CFR_FORMS), ("cfm", self.cfm, CFM_FORMS),
                                    ("reduction", self.reduction, REDUCTIONS)):
            if value not in allowed:
                raise ImemError(f"params: train {key} = {value!r} is not one of: {', '.join(allowed)}")

    @classmethod
    def from_config(cls, cfg: dict) -> LossSettings:
        return cls(float(cfg["margin"]), cfg.get("cfr", "pair"), cfg.get("cfm", "hinge"),
                   cfg.get("reduction", "sum"), cfg.get("distance", "squared") == "squared")


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """(n, d) x (m, d) -> (n, m) distances by the ||a||^2 + ||b||^2 - 2ab expansion in float64 (a matrix
    product), clamped at 0 and returned in ``a``'s dtype. In float64 identical rows (the same image in two
    pairs of a batch) get a rounding residue of ~1e-16 ||a||^2 (below 1e-12 at the embeddings' scale, six
    orders under LOG_EPS) instead of float32's ~1e-7 ||a||^2, so both sides of a log-ratio still see 0. It
    replaced torch.cdist's element-wise kernel, which took 12 ms forward + backward at 128 x 128 x 512 on one
    CPU thread against 3 ms (a third of a cnn epoch, measured)."""
    a64, b64 = a.double(), b.double()
    d2 = ((a64 * a64).sum(1, keepdim=True) + (b64 * b64).sum(1)[None] - 2.0 * (a64 @ b64.T)).clamp_min(0.0)
    d2 = d2.to(a.dtype)
    if squared:
        return d2
    return torch.sqrt(d2 + 1e-4 / a.shape[-1])


def _reduce(per_anchor: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_anchor.sum() if reduction == "sum" else per_anchor.mean()


def log_ratio_loss(
    emb_anchor: torch.Tensor,
    emb_nbr: torch.Tensor,
    lab_anchor: torch.Tensor,
    lab_nbr: torch.Tensor,
    squared: bool = True,
    same_set: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    # Kim et al. CVPR 2019 log-ratio loss; CDCML eqs. 4-5: ([log D(f_a,f_j) - log D(f_a,f_k)] - [log D(y_a,y_j) - log D(y_a,y_k)])^2
    """Per anchor the mean over its neighbour pairs ``j < k`` (``same_set``: the anchor is not its own
    neighbour), then the sum or mean over anchors."""
    le = torch.log(pairwise_distance(emb_anchor, emb_nbr, squared) + LOG_EPS)  # (n, m)
    with torch.no_grad():
        ll = torch.log(pairwise_distance(lab_anchor.to(le.dtype), lab_nbr.to(le.dtype), squared) + LOG_EPS)
    # With x_j = log D(f_a, f_j) - log D(y_a, y_j), each term is (x_j - x_k)^2, and
    # sum_{j<k} (x_j - x_k)^2 = n * sum_j (x_j - mean x)^2 over the anchor's n neighbours: the mean over the
    # n(n-1)/2 pairs is exactly twice the unbiased variance of x. O(B^2) instead of O(B^3), same value.
    x = le - ll  # (n, m)
    valid = torch.ones_like(x, dtype=torch.bool)
    if same_set:
        valid.fill_diagonal_(False)
    counts = valid.sum(dim=1)
    keep = counts >= 2
    if not bool(keep.any()):
        return le.sum() * 0.0  # fewer than two neighbours: no ratio to compare
    xm = torch.where(valid, x, torch.zeros_like(x))
    mean = xm.sum(dim=1, keepdim=True) / counts.clamp(min=1).unsqueeze(1)
    centred = torch.where(valid, x - mean, torch.zeros_like(x))
    per_anchor = 2.0 * centred.pow(2).sum(dim=1) / (counts - 1).clamp(min=1)
    return _reduce(per_anchor[keep], reduction)


def sigma_of(score: torch.Tensor, va_distance: torch.Tensor) -> torch.Tensor:
    """The sigma of eq. 1 recovered from a batch's own pairs (S = exp(-d / sigma) -> sigma = d / -log S), for
    ``cfr: literal``, which needs S of pairs the batch does not list."""
    ok = (score > 0) & (score < 1 - 1e-6) & (va_distance > 0)
    if not bool(ok.any()):
        return torch.tensor(1.0, dtype=va_distance.dtype)
    return (va_distance[ok] / -torch.log(score[ok].to(va_distance.dtype))).mean()


def partner_log_ratio(f_a, f_b, y_a, y_b, squared: bool = True, literal_sigma: torch.Tensor | None = None,
                      reduction: str = "mean") -> torch.Tensor:
    # CDCML eq. 2, one half: anchor a_i, its partner b_i and each other b_j: ([log D(f_ai,f_bi) - log D(f_ai,f_bj)] - [label log-ratio])^2
    """Anchor ``a_i``, its own pair partner ``b_i`` and every other ``b_j`` of the batch as the random neighbour
    (the expectation over j); label log-ratio log D(y_ai, y_bi) / D(y_ai, y_bj) (``cfr: pair``), or with
    ``literal_sigma`` eq. 2 as printed, log S(a_i, b_i) / S(a_i, b_j) = (d_ij - d_ii) / sigma."""
    n = f_a.shape[0]
    if n < 2:
        return f_a.sum() * 0.0
    le = torch.log(pairwise_distance(f_a, f_b, squared) + LOG_EPS)  # (n, n): [i, j] = log D(f_ai, f_bj)
    x = le.diagonal().unsqueeze(1) - le
    with torch.no_grad():
        ya, yb = y_a.to(le.dtype), y_b.to(le.dtype)
        if literal_sigma is None:
            ll = torch.log(pairwise_distance(ya, yb, squared) + LOG_EPS)
            t = ll.diagonal().unsqueeze(1) - ll
        else:
            d = pairwise_distance(ya, yb, squared=True).sqrt()  # eq. 1's d: the plain Euclidean VA distance
            t = (d - d.diagonal().unsqueeze(1)) / literal_sigma  # log S_ii - log S_ij
    off = ~torch.eye(n, dtype=torch.bool, device=le.device)
    per_anchor = torch.where(off, (x - t).pow(2), torch.zeros_like(x)).sum(dim=1) / (n - 1)
    return _reduce(per_anchor, reduction)


def cfr_loss(f_img, f_mus, y_img, y_mus, settings: LossSettings = LossSettings(), score=None) -> torch.Tensor:
    # CDCML eq. 2 (thesis eq. 3.2; mean form eq. 3.3): image anchors + music anchors, the two halves ADDED
    if settings.cfr == "dense":
        return (log_ratio_loss(f_img, f_mus, y_img, y_mus, settings.squared, reduction=settings.reduction)
                + log_ratio_loss(f_mus, f_img, y_mus, y_img, settings.squared, reduction=settings.reduction))
    sigma = None
    if settings.cfr == "literal":
        if score is None:
            raise ImemError("cfr: literal needs the batch's similarity scores")
        sigma = sigma_of(score, (y_img.double() - y_mus.double()).norm(dim=-1))
    return (partner_log_ratio(f_img, f_mus, y_img, y_mus, settings.squared, sigma, settings.reduction)
            + partner_log_ratio(f_mus, f_img, y_mus, y_img, settings.squared, sigma, settings.reduction))


def sfr_loss(f, y, squared: bool = True, reduction: str = "mean") -> torch.Tensor:
    # CDCML eqs. 4-5 (thesis eqs. 3.5-3.6): single-modal feature-ratio, anchor i and neighbours j != k of the same modality
    return log_ratio_loss(f, f, y, y, squared, same_set=True, reduction=reduction)


def cfm_loss(f_img: torch.Tensor, f_mus: torch.Tensor, s: torch.Tensor, margin: float, form: str = "hinge",
             reduction: str = "mean") -> torch.Tensor:
    """``hinge``: the paper's form; ``contrastive``: imem's earlier form, not the paper's (module docstring)."""
    if form == "hinge":
        # CDCML eq. 3 (thesis eq. 3.4): [||f_Ii - f_Mi||_2 - alpha]_+ on every pair
        d = torch.linalg.vector_norm(f_img - f_mus, dim=-1)
        return _reduce(F.relu(d - margin), reduction)
    # not in the papers: contrastive loss S d^2 + (1 - S) [alpha - d]_+^2 (Hadsell et al. 2006 with a soft label)
    d = torch.sqrt((f_img - f_mus).pow(2).sum(-1) + 1e-4 / f_img.shape[-1])
    return _reduce(s * d.pow(2) + (1 - s) * F.relu(margin - d).pow(2), reduction)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # CDCML eq. 6 (thesis eq. 3.7): L_Sim = (1/N) sum_i (S_i - S^_i)^2, a scalar per pair
    return F.mse_loss(pred, target.to(pred.dtype))


def va_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # CDCML eq. 7 (thesis eqs. 3.8-3.9): L_VA = (1/n) sum_j ||y_j - y^_j||^2, summed over valence and arousal
    return (pred - target.to(pred.dtype)).pow(2).sum(dim=-1).mean()


def cdcml_losses(out: dict, batch: dict, settings: LossSettings = LossSettings(), active=LOSS_NAMES) -> dict:
    """The seven losses of a batch of image-music pairs (only the ``active`` ones are computed).

    ``out``: model outputs ``f_image, f_music`` (B, d), ``sim`` (B,), ``va_image, va_music`` (B, 2);
    ``batch``: ``image_va, music_va`` (B, 2) and ``score`` (B,) = S.
    """
    fi, fm = out["f_image"].float(), out["f_music"].float()
    yi, ym = batch["image_va"], batch["music_va"]
    st, red = settings, settings.reduction
    fns = {
        "cfr": lambda: cfr_loss(fi, fm, yi, ym, st, batch["score"]),
        "cfm": lambda: cfm_loss(fi, fm, batch["score"], st.margin, st.cfm, red),
        "sfr_image": lambda: sfr_loss(fi, yi, st.squared, red),
        "sfr_music": lambda: sfr_loss(fm, ym, st.squared, red),
        "sim": lambda: mse(out["sim"].float(), batch["score"]),
        "va_image": lambda: va_mse(out["va_image"].float(), yi),
        "va_music": lambda: va_mse(out["va_music"].float(), ym),
    }
    return {name: fns[name]() for name in active}


class LossCombiner:
    """Total loss from the per-loss values.

    ``sum``: CDCML eq. 8, the weighted sum ``sum_i w_i L_i``.
    ``first_batch``: thesis eq. 3.10, each loss divided by its value on the first training batch, then
    the weighted mean. The first-batch values are part of :meth:`state_dict` so a resumed run uses the
    same ones. A weight of 0 drops a loss (CDCML's ablation, table 4, is a params change).
    """

    def __init__(self, mode: str = "sum", weights: dict | None = None):
        if mode not in ("sum", "first_batch"):
            raise ImemError(f"params: train loss_mode = {mode!r} is not one of: sum, first_batch")
        self.mode = mode
        self.weights = {k: float(v) for k, v in (weights or {}).items()}
        self.first: dict[str, float] = {}

    def active(self, names=LOSS_NAMES) -> tuple[str, ...]:
        return tuple(n for n in names if self.weights.get(n, 1.0) != 0.0)

    def __call__(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
        if bad:
            raise NonFiniteLoss(f"non-finite loss: {', '.join(f'{k} = {float(losses[k].detach())}' for k in bad)}")
        if self.mode == "sum":
            return sum(self.weights.get(k, 1.0) * v for k, v in losses.items())
        for k, v in losses.items():
            if k not in self.first:
                value = float(v.detach())
                self.first[k] = value if abs(value) > 1e-12 else 1.0
        w = {k: self.weights.get(k, 1.0) for k in losses}
        return sum(w[k] * v / self.first[k] for k, v in losses.items()) / sum(w.values())

    def state_dict(self) -> dict:
        return {"mode": self.mode, "weights": dict(self.weights), "first": dict(self.first)}

    def load_state_dict(self, state: dict) -> None:
        self.mode, self.weights, self.first = state["mode"], dict(state["weights"]), dict(state["first"])


class NonFiniteLoss(ImemError):
    """A NaN or inf loss: training stops (an Optuna trial is pruned)."""


