"""Gated and Matryoshka BatchTopK SAEs, and optional outlier-token masking, against independent references.

* the training objectives equal sae_lens's own training SAEs (GatedTrainingSAE, MatryoshkaBatchTopKTrainingSAE)
  loss term by loss term on the same weights and batch;
* trained on a planted dictionary (sparse combinations of known unit directions) both recover it, and the
  Matryoshka SAE's first level reconstructs on its own far better than the same prefix of a plain BatchTopK SAE;
* saved in SAELens's layout, ``sae_lens.SAE.load_from_disk`` encodes exactly as ours, and loading back gives the
  same SAE (Matryoshka saves as JumpReLU, as SAELens does);
* masking drops the outlier-norm rows from training (a planted massive token) and keeps the others.
"""

from __future__ import annotations

import pytest
import torch

from workbench.circuits.sae.base import SAEConfig, SAEInputError
from workbench.circuits.sae.formats import load_sae
from workbench.circuits.sae.formats.saelens import load_saelens, save_saelens
from workbench.circuits.sae.train import TrainConfig, seeded_sae, train_sae

D_IN, D_SAE, N_ATOMS = 16, 64, 32


def _planted(n_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [n_rows, D_IN], atoms [N_ATOMS, D_IN]): rows are sparse non-negative combinations of unit atoms, the
    first atoms far more frequent (so a Matryoshka prefix has general features to learn)."""
    generator = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(N_ATOMS, D_IN, generator=generator), dim=1)
    generator.manual_seed(seed)
    frequency = 0.3 * torch.linspace(1, 0.1, N_ATOMS)
    codes = torch.rand(n_rows, N_ATOMS, generator=generator) * (torch.rand(n_rows, N_ATOMS, generator=generator)
                                                                 < frequency)  # fmt: skip
    return codes @ atoms * 2, atoms


def _batches(steps: int, batch: int = 128):
    data, _ = _planted(steps * batch, 1)
    return list(data.view(steps, batch, D_IN))


def _fvu(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.fixture(scope="module")
def trained():
    cfg = TrainConfig(steps=300, lr=3e-3, warmup_steps=10, progress=False, dead_after_tokens=2048)
    specs = {
        "gated": SAEConfig("gated", d_in=D_IN, d_sae=D_SAE, l1_coefficient=3.0),
        "matryoshka": SAEConfig(
            "matryoshka_batchtopk", d_in=D_IN, d_sae=D_SAE, k=6, matryoshka_widths=[8, 32]
        ),
        "batchtopk": SAEConfig("batchtopk", d_in=D_IN, d_sae=D_SAE, k=6),
    }
    return {name: train_sae(seeded_sae(c, 0), _batches(cfg.steps), cfg).eval() for name, c in specs.items()}


def _matched(x_sae, y_sae, x):
    torch.testing.assert_close(x_sae.encode(x), y_sae.encode(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- objectives
def _random_weights(sae, generator):
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        sae.normalize_decoder()


def test_gated_objective_equals_sae_lens_gated_training_sae():
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    generator = torch.Generator().manual_seed(3)
    ours = seeded_sae(SAEConfig("gated", d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.2), 0)
    _random_weights(ours, generator)
    theirs = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.2,
                                                     apply_b_dec_to_input=False))  # fmt: skip
    theirs.load_state_dict({("b_gate" if k == "b_enc" else k): v for k, v in ours.state_dict().items()})
    x = torch.randn(32, D_IN, generator=generator)
    out = theirs.training_forward_pass(TrainStepInput(x, {"l1": 0.2}, None, 0, False))
    f, prediction, pre, _ = ours.training_forward(x)
    mine = {"mse_loss": (x - prediction).pow(2).sum(-1).mean(), "l1_loss": ours.sparsity_loss(f, pre)["l1"],
            "auxiliary_reconstruction_loss": ours.auxiliary_losses(x, x, f, pre)["gate_reconstruction"]}  # fmt: skip
    for name, value in mine.items():
        torch.testing.assert_close(value, out.losses[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(f, out.feature_acts, rtol=1e-5, atol=1e-6)


def test_matryoshka_objective_equals_sae_lens_matryoshka_batchtopk():
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    generator = torch.Generator().manual_seed(4)
    ours = seeded_sae(
        SAEConfig("matryoshka_batchtopk", d_in=D_IN, d_sae=D_SAE, k=4, matryoshka_widths=[8, 16]), 0
    )
    assert ours.cfg.matryoshka_widths == [8, 16, D_SAE]
    _random_weights(ours, generator)
    theirs = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, matryoshka_widths=[8, 16, D_SAE], apply_b_dec_to_input=False,
        rescale_acts_by_decoder_norm=False))  # fmt: skip
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "threshold"}, strict=False)
    x = torch.randn(32, D_IN, generator=generator)
    out = theirs.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
    f, prediction, pre, _ = ours.training_forward(x)
    torch.testing.assert_close(f.to_dense(), out.feature_acts.to_dense(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        (x - prediction).pow(2).sum(-1).mean(), out.losses["mse_loss"], rtol=1e-5, atol=1e-6
    )
    inner = out.losses["inner_mse_loss_8"] + out.losses["inner_mse_loss_16"]
    torch.testing.assert_close(ours.auxiliary_losses(x, x, f, pre)["matryoshka"], inner, rtol=1e-5, atol=1e-6)


def test_bad_matryoshka_widths_are_refused():
    with pytest.raises(SAEInputError, match=r"matryoshka_widths=\[0, 8\].*nested prefix sizes"):
        SAEConfig("matryoshka_batchtopk", d_in=D_IN, d_sae=D_SAE, k=4, matryoshka_widths=[0, 8])
    with pytest.raises(SAEInputError, match="k=None is invalid"):
        SAEConfig("matryoshka_batchtopk", d_in=D_IN, d_sae=D_SAE)


# ---------------------------------------------------------------------------------------------- training
def test_gated_and_matryoshka_recover_a_planted_dictionary(trained):
    """Rows hold ~5.3 of 32 planted atoms: Gated (L1 3.0) and BatchTopK (k 6) find every atom at L0 ≈ 6; Matryoshka
    reconstructs as well as BatchTopK at the same L0 (its nested levels spend latents on frequent combinations)."""
    held_out, atoms = _planted(2048, 7)
    fvu = {name: _fvu(sae, held_out) for name, sae in trained.items()}
    for name, sae in trained.items():
        with torch.no_grad():
            l0 = float((sae.encode(held_out) > 0).sum(-1).float().mean())
        assert l0 < 7.5 and fvu[name] < 0.15, (name, l0, fvu[name])
        cosine = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ atoms.T  # [d_sae, atoms]
        recovered = float((cosine.max(0).values > 0.9).float().mean())
        assert name == "matryoshka" or recovered > 0.9, (
            f"{name} recovered {recovered:.0%} of the planted atoms"
        )
    assert fvu["matryoshka"] < 1.1 * fvu["batchtopk"]


def test_matryoshka_first_level_reconstructs_alone(trained):
    held_out, _ = _planted(2048, 7)

    def prefix_fvu(sae, width):
        with torch.no_grad():
            f = sae.encode(held_out)
            recon = f[:, :width] @ sae.W_dec[:width] + sae.b_dec
            return float((recon - held_out).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum())

    nested, plain = prefix_fvu(trained["matryoshka"], 8), prefix_fvu(trained["batchtopk"], 8)
    assert nested < 0.6 * plain, (nested, plain)  # 0.32 vs 0.63


# ---------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("name", ["gated", "matryoshka"])
def test_saelens_layout_round_trip(trained, name, tmp_path):
    from sae_lens import SAE as SaeLensSAE

    sae = trained[name]
    x, _ = _planted(256, 9)
    save_saelens(sae, tmp_path / "saelens")
    theirs = SaeLensSAE.load_from_disk(str(tmp_path / "saelens"))
    assert theirs.cfg.architecture() == ("gated" if name == "gated" else "jumprelu")
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        _matched(load_saelens(tmp_path / "saelens"), sae, x)
        _matched(load_sae(sae.save(tmp_path / "ours")), sae, x)


def test_gated_saelens_file_with_input_centering_loads_folded(tmp_path):
    """A gated SAE saved by sae_lens itself with apply_b_dec_to_input (its default) encodes the same here."""
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig

    theirs = GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=True))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    theirs.save_model(str(tmp_path))
    x = torch.randn(64, D_IN, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(load_sae(tmp_path).encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- masking
def test_outlier_masking_drops_a_planted_massive_token():
    """One row in 16 is an attention-sink-like token: a fixed direction at 60× the typical norm. Excluding rows
    over 10× the median norm masks exactly those rows and reconstructs the ordinary rows better."""
    data, _ = _planted(200 * 64, 1)
    sink = torch.zeros(D_IN)
    sink[3] = 60 * float(data.norm(dim=-1).median())
    data.view(200, 64, D_IN)[:, ::16] = sink + 0.01 * data.view(200, 64, D_IN)[:, ::16]
    held_out, _ = _planted(2048, 7)
    fvu = {}
    for label, extra in (("plain", {}), ("exclude", {"outlier_norm": 10.0}), ("cap", {"outlier_norm": 10.0,
                                                                                     "outlier_action": "cap"})):  # fmt: skip
        cfg = TrainConfig(
            steps=200, lr=3e-3, warmup_steps=10, progress=False, dead_after_tokens=2048, **extra
        )
        result = train_sae_history(
            SAEConfig("topk", d_in=D_IN, d_sae=D_SAE, k=6), list(data.view(200, 64, D_IN)), cfg
        )
        sae, history = result
        fvu[label] = _fvu(sae.eval(), held_out)
        if extra:
            assert {row["masked"] for row in history} == {4 / 64}, label
    assert fvu["exclude"] < 0.8 * fvu["plain"], fvu
    with pytest.raises(ValueError, match="outlier_norm=0.5.*factor above 1"):
        train_sae(seeded_sae(SAEConfig("topk", d_in=D_IN, d_sae=D_SAE, k=6), 0), [data[:64]],
                  TrainConfig(steps=1, progress=False, outlier_norm=0.5))  # fmt: skip


def train_sae_history(cfg: SAEConfig, batches, train_cfg: TrainConfig):
    from workbench.circuits.sae.train import train_saes

    result = train_saes({"sae": seeded_sae(cfg, 0)}, batches, train_cfg)
    return result.saes["sae"], result.history["sae"]
