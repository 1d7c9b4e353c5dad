"""Shared SAE / transcoder module, config and safetensors writer (the architecture registry is ``registry.py``,
reading any layout back is ``formats.load_sae``).

An SAE maps x [.., d_in] to latents f = encode(x) [.., d_sae] and back to decode(f) [.., d_out]
(d_out = d_in for an SAE; a transcoder reads `hook_in` and predicts `hook_out`; a skip transcoder adds x @ W_skip).
Pre-activations are x @ W_enc + b_enc (no b_dec subtraction; SAELens files with it are folded on load).
"""

from __future__ import annotations

import abc
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.circuits.sae.registry import K_ARCHITECTURES, architectures
from workbench.circuits.sae.registry import create_sae as create_sae  # re-exported: the registry is its home
from workbench.circuits.sae.registry import register as register  # re-exported for the architecture modules
from workbench.fileio import atomic_save_tensors, atomic_write_text

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "workbench_sae.json"


class SAEInputError(ValueError):
    """Bad input to an SAE: wrong shape, non-finite values, unknown architecture, invalid k."""


PER_HEAD_HOOKS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")  # [batch, pos, n_heads, d_head]


def token_vectors(activation: torch.Tensor, width: int) -> torch.Tensor:
    """One vector per token: ``activation`` [..., width] as it is, a per-head activation [..., n_heads, d_head]
    with n_heads·d_head = ``width`` with its heads flattened → [..., width] (how an SAE reads ``attn.hook_z``, as
    SAELens's ``reshape_activations: hook_z``). Any other shape comes back unchanged for the caller's width check
    to name."""
    if (
        activation.ndim >= 2
        and activation.shape[-1] != width
        and activation.shape[-2] * activation.shape[-1] == width
    ):
        return activation.flatten(-2)
    return activation


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE; `k` is used by topk/batchtopk/matryoshka_batchtopk, `threshold` init by
    jumprelu, `matryoshka_widths` (nested prefix sizes ending at d_sae; default d_sae/8, /4, /2, 1) by
    matryoshka_batchtopk."""

    architecture: str
    d_in: int
    d_sae: int
    d_out: int | None = None
    skip: bool = False
    k: int | None = None
    l1_coefficient: float = 1e-3
    l0_coefficient: float = 1e-3
    aux_k_coefficient: float = 1 / 32
    aux_k: int | None = None
    bandwidth: float = 0.05
    init_threshold: float = 0.05
    matryoshka_widths: list[int] | None = None
    hook_in: str = ""
    hook_out: str = ""
    model: str = ""
    checkpoint: int | None = None
    dataset: str = ""

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        if not self.hook_out:
            self.hook_out = self.hook_in
        if self.architecture not in architectures():
            raise SAEInputError(
                f"unknown SAE architecture {self.architecture!r}; use one of {sorted(architectures())}"
            )
        if min(self.d_in, self.d_sae, self.d_out) <= 0:
            raise SAEInputError(
                f"d_in, d_sae and d_out must be positive, got {self.d_in}, {self.d_sae}, {self.d_out}"
            )
        if self.architecture in K_ARCHITECTURES and (self.k is None or not 0 < self.k <= self.d_sae):
            raise SAEInputError(
                f"k={self.k} is invalid for d_sae={self.d_sae}: pass 1 <= k <= d_sae (or widen the SAE)"
            )
        if self.architecture == "matryoshka_batchtopk":
            widths = list(
                self.matryoshka_widths
                or [max(1, self.d_sae // 8), max(1, self.d_sae // 4), max(1, self.d_sae // 2), self.d_sae]
            )
            widths = sorted(set(widths))
            if widths[-1] < self.d_sae:
                widths.append(self.d_sae)  # the outer level is the whole dictionary
            if widths[0] < 1 or widths[-1] != self.d_sae:
                raise SAEInputError(
                    f"matryoshka_widths={self.matryoshka_widths} must be nested prefix sizes 1 <= w <= d_sae "
                    f"(d_sae={self.d_sae}), e.g. [{self.d_sae // 4}, {self.d_sae // 2}, {self.d_sae}]"
                )
            self.matryoshka_widths = widths

    @property
    def is_transcoder(self) -> bool:
        return self.skip or self.hook_out != self.hook_in or self.d_out != self.d_in

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


class SAE(nn.Module, abc.ABC):
    """Base sparse autoencoder / transcoder; subclasses define `activation` and `training_loss`."""

    architecture = "base"
    # parameters [.., d_sae] whose gradient the training backward adds one latent (last-dim index) at a time: the
    # trainer stores them latent-major so that each latent's entries are contiguous
    latent_major_parameters: tuple[str, ...] = ()

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_out = cfg.d_in if cfg.d_out is None else cfg.d_out  # SAEConfig.__post_init__ fills it in
        self.d_in, self.d_sae, self.d_out = cfg.d_in, cfg.d_sae, d_out
        self.hook_in, self.hook_out = cfg.hook_in, cfg.hook_out
        w_dec = torch.randn(cfg.d_sae, d_out)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        w_enc = w_dec.T.clone() if cfg.d_in == d_out else torch.randn(cfg.d_in, cfg.d_sae) / cfg.d_in**0.5
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, d_out)) if cfg.skip else None

    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise SAEInputError for a wrong last dimension or a non-finite row."""
        hook = self.hook_in or "input"
        if x.shape[-1] != self.d_in:
            raise SAEInputError(
                f"{name} for hook {hook!r} has last dimension {x.shape[-1]} but this SAE has d_in={self.d_in}: "
                "use an SAE trained on this hook/model"
            )
        if x.numel() and bool(torch.isfinite(x.sum())):
            return  # fast path: one reduction; a non-finite sum (NaN/inf, or overflow) gets the row check
        finite = torch.isfinite(x.reshape(-1, x.shape[-1])).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            raise SAEInputError(
                f"{name} for hook {hook!r} has NaN/inf values in row {row}: fix or drop those activations"
            )

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """[.., d_in] -> [.., d_sae] (one fused multiply-add for a 2-D batch)."""
        if x.dim() == 2:
            return torch.addmm(self.b_enc, x, self.W_enc)
        return x @ self.W_enc + self.b_enc

    @abc.abstractmethod
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Latents from pre-activations, [.., d_sae] -> [.., d_sae]; each architecture file defines its own."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[.., d_in] -> latents [.., d_sae]."""
        return self.activation(self.pre_activation(x.to(self.W_enc.dtype)))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [.., d_sae] -> [.., d_out]; a skip transcoder also needs its input x [.., d_in]."""
        out = f @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise SAEInputError("a skip transcoder's decode needs its input x: call decode(f, x)")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (SAE) or predicted output (transcoder), [.., d_out]."""
        return self.decode(self.encode(x), x)

    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x [batch, d_in] -> (latents, prediction, pre-activations, extra losses); overridden where training differs."""
        pre = self.pre_activation(x)
        f = self.activation(pre)
        return f, self.decode(f, x), pre, {}

    def sparsity_loss(self, f: torch.Tensor, pre: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra training-loss terms from latents f [batch, d_sae] (dense; TopK's is sparse COO and unused) and
        pre-activations pre [batch, d_sae]: {name: scalar tensor []} added to the MSE. None in the base class."""
        return {}

    def auxiliary_losses(
        self, x: torch.Tensor, y: torch.Tensor, f: torch.Tensor, pre: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Training-loss terms that need the input x [batch, d_in] and target y [batch, d_out] besides the latents f
        and pre-activations pre [batch, d_sae] (Gated's frozen-decoder reconstruction, Matryoshka's nested
        prefixes): {name: scalar tensor []} added to the MSE. None in the base class."""
        return {}

    @torch.no_grad()
    def initialize_from_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data-dependent initialisation from the first training batch x [batch, d_in], y [batch, d_out].

        b_dec starts at the mean target (minus the skip path's mean), the encoder is centred on the mean input
        (b_enc = −mean(x) W_enc), and W_enc, b_enc (and a JumpReLU threshold, so the same latents fire) are scaled
        by the least-squares factor c that makes the initial reconstruction f W_dec best fit y − b_dec. Without
        it, W_enc = W_decᵀ with unit rows over-shoots by ~9k/d_in when k is a sizeable fraction of d_in (initial
        FVU ≈ 8 at k = 32, d_in = 64)."""
        skip = x @ self.W_skip if self.W_skip is not None else 0.0
        self.b_dec.copy_((y - skip).mean(0))
        self.center_encoder(x.mean(0))
        pred = self.latent_reconstruction(x)
        c = float((pred * (y - skip - self.b_dec)).sum() / pred.pow(2).sum().clamp_min(1e-12))
        if math.isfinite(c) and c > 0:
            self.scale_encoder(c)

    def latent_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """encode(x) @ W_dec, the decoder's output without biases or skip path: [batch, d_in] -> [batch, d_out]."""
        return self.encode(x) @ self.W_dec

    @torch.no_grad()
    def center_encoder(self, mean_x: torch.Tensor) -> None:
        """Biases making the pre-activations of the mean input [d_in] zero (b_enc = −mean_x W_enc)."""
        self.b_enc.copy_(-(mean_x @ self.W_enc))

    @torch.no_grad()
    def scale_encoder(self, c: float) -> None:
        """Scale the encoder (W_enc, b_enc, a learned threshold) by c: every latent's value scales by c."""
        self.W_enc.mul_(c)
        self.b_enc.mul_(c)
        threshold = getattr(self, "threshold", None)
        if isinstance(threshold, nn.Parameter):
            threshold.mul_(c)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def fold_scaling(self, scale_in: float, scale_out: float) -> None:
        """Make an SAE trained on x*scale_in -> y*scale_out act on raw x and predict raw y (same latents)."""
        self.W_enc.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.W_skip is not None:
            self.W_skip.mul_(scale_in / scale_out)

    def inference_state(self) -> tuple[str, dict[str, torch.Tensor]]:
        """(architecture to save as, fp32 tensors) — BatchTopK saves itself as JumpReLU."""
        return self.cfg.architecture, {
            k: v.detach().float().contiguous() for k, v in self.state_dict().items()
        }

    def save(self, path: str | Path) -> Path:
        """Write `sae_weights.safetensors` + `workbench_sae.json` atomically into directory `path`."""

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        architecture, tensors = self.inference_state()
        cfg = asdict(self.cfg) | {"architecture": architecture}
        atomic_save_tensors(path / WEIGHTS_FILE, tensors)
        atomic_write_text(path / CONFIG_FILE, json.dumps(cfg, indent=2))
        return path

    @property
    def device(self) -> torch.device:
        return self.W_enc.device
