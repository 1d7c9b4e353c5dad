"""install_attention under the hooked models: same logits, statistics equal to the eager-pattern path."""

from __future__ import annotations

import pytest
import torch

from tests.workbench.test_model import tiny_bert, tiny_gpt2, tiny_llama, tl_twin
from workbench.attention import install_attention, uninstall_attention
from workbench.attention.kernel import kernel_available
from workbench.model import HookedModel

pytestmark = pytest.mark.skipif(
    not kernel_available(torch.device("cpu"))[0],
    reason="needs TRITON_INTERPRET=1 before import (set by make test)",
)
STATS = ("entropy", "sink", "lse", "max_logit")


def _compare_paths(model: HookedModel, inputs, attention_mask=None) -> None:
    names = ["blocks.*.attn.hook_pattern", *[f"blocks.*.attn.hook_{s}" for s in STATS]]
    with torch.no_grad():
        model.set_attention_path("eager")
        with model.capture(names) as eager:
            eager_logits = model(inputs, attention_mask=attention_mask)
        uninstall_attention(model)
        bare = model(inputs, attention_mask=attention_mask)
        install_attention(model)
        kernel_logits = model(inputs, attention_mask=attention_mask)
        with model.capture([f"blocks.*.attn.hook_{s}" for s in STATS]) as kernel:
            model(inputs, attention_mask=attention_mask)
    torch.testing.assert_close(kernel_logits, bare, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(eager_logits, bare, atol=2e-5, rtol=1e-4)
    real = attention_mask.bool() if attention_mask is not None else None
    for layer in range(model.cfg.n_layers):
        pattern = eager[f"blocks.{layer}.attn.hook_pattern"].double()
        from_pattern = -(pattern * pattern.clamp_min(1e-300).log()).sum(-1)
        for stat in STATS:
            name = f"blocks.{layer}.attn.hook_{stat}"
            got, want = kernel[name].double(), eager[name].double()
            if real is not None:  # padding queries are not compared
                got, want = got.transpose(1, 2)[real], want.transpose(1, 2)[real]
            torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4, msg=name)
        entropy = kernel[f"blocks.{layer}.attn.hook_entropy"].double()
        if real is None:
            torch.testing.assert_close(entropy, from_pattern, atol=5e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="materialised pattern"):
        with torch.no_grad(), model.capture("blocks.0.attn.hook_pattern"):
            model(inputs, attention_mask=attention_mask)
    uninstall_attention(model)
    assert model.attention_path == "sdpa"


def test_kernel_path_on_a_zoo_checkpoint_equals_the_eager_pattern_path(code_series) -> None:
    model = code_series.load(code_series.steps[-1])
    ids = model.to_tokens(["def f(x):\n    return (x + 1) * 2\n", "import os\nprint(os.getcwd())\n"])
    mask = model.tokenize(["def f(x):\n    return (x + 1) * 2\n", "import os\nprint(os.getcwd())\n"])[
        "attention_mask"
    ]
    _compare_paths(model, ids, mask)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_kernel_path_on_decoders(build) -> None:
    model = HookedModel.from_hf(build())
    _compare_paths(model, torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(0)))


def test_kernel_path_on_a_padded_encoder() -> None:
    model = HookedModel.from_hf(tiny_bert())
    ids = torch.randint(1, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    _compare_paths(model, ids, mask)


def test_kernel_path_on_transformer_lens() -> None:
    tl = tl_twin(tiny_gpt2(), "gpt2")
    model = HookedModel.from_transformer_lens(tl)
    _compare_paths(model, torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2)))
    assert "forward" not in tl.blocks[0].attn.__dict__
