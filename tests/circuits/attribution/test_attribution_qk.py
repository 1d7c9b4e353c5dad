"""QK attribution on tiny random float64 models: the (query-side source × key-side source) terms of one head's
pre-softmax score, plus its bias terms, sum to the score computed independently from the real model's q and k
(GPT-2: hook_q · hook_k / √d_head; Llama with grouped-query attention and GPT-NeoX: the captured projections rotated
by Hugging Face's own rotary functions)."""

from __future__ import annotations

import pytest
import torch

from tests.circuits.attribution.test_attribution import TOKENS, _clt, _model, _per_layer
from workbench.circuits.attribution.qk import BIAS_NODE, qk_attribution
from workbench.circuits.attribution.transcoders import AttributionError

LAYER, HEAD, QUERY, KEY = 1, 3, 5, 2


def _reference_score(model, layer: int, head: int, query: int, key: int) -> float:
    """The model's pre-softmax score from its captured q / k, rotated with Hugging Face's rotary code if it has one."""
    names = [f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"]
    with torch.no_grad(), model.capture(names) as cache:
        model(TOKENS[None])
    q, k = (cache[name].transpose(1, 2) for name in names)  # [batch, heads, pos, d_head]
    hf = model.model
    base = getattr(hf, "model", None) or getattr(hf, "gpt_neox", None)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:
        module = type(hf).__module__
        apply = __import__(module, fromlist=["apply_rotary_pos_emb"]).apply_rotary_pos_emb
        cos, sin = rotary(q, torch.arange(len(TOKENS))[None])
        q, k = apply(q, k, cos, sin)
    kv = head // (q.shape[1] // k.shape[1])
    return float(q[0, head, query] @ k[0, kv, key]) * q.shape[-1] ** -0.5


@pytest.mark.parametrize(
    ("family", "make"),
    [("gpt2", lambda: _per_layer("ln2.hook_normalized", skip=True)),
     ("llama", lambda: _per_layer("hook_resid_mid", skip=False, architecture="jumprelu")),
     ("llama", _clt), ("gpt_neox", lambda: _per_layer("hook_resid_pre", skip=False))],
    ids=["gpt2-ln2-skip", "llama-gqa", "llama-clt", "neox-rotary"],
)  # fmt: skip
def test_qk_terms_sum_to_the_models_score(family, make) -> None:
    model = _model(family)
    frame = qk_attribution(model, make(), TOKENS, layer=LAYER, head=HEAD, query=QUERY, key=KEY)
    reference = _reference_score(model, LAYER, HEAD, QUERY, KEY)
    assert float(frame["score"].sum()) == pytest.approx(reference, abs=1e-7)
    assert frame.attrs["score"] == pytest.approx(reference, abs=1e-7)
    assert frame["score"].abs().is_monotonic_decreasing
    kinds = set(frame["query_kind"]) | set(frame["key_kind"])
    assert {"feature", "error", "token", "bias"} <= kinds and (family != "gpt2" or "position" in kinds)
    pairs = frame[(frame["query_node"] >= 0) & (frame["key_node"] >= 0)]
    assert len(pairs) > 0 and not frame.duplicated(["query_node", "key_node"]).any()
    assert (frame["query_node"] == BIAS_NODE).any() and (frame["key_node"] == BIAS_NODE).any()
    assert not pairs["key_label"].str.contains(r"@[6-9]").any()  # a key-side source sits at or before the key
    short = qk_attribution(model, make(), TOKENS, layer=LAYER, head=HEAD, query=QUERY, key=KEY, top=5)
    assert len(short) == 6 and short.iloc[-1]["query_kind"] == "other"
    assert float(short["score"].sum()) == pytest.approx(reference, abs=1e-7)


def test_qk_bad_positions_are_refused() -> None:
    model, transcoders = _model("gpt2"), _per_layer("ln2.hook_normalized", skip=True)
    with pytest.raises(AttributionError, match="pick key ≤ query"):
        qk_attribution(model, transcoders, TOKENS, layer=1, head=0, query=2, key=5)
    with pytest.raises(AttributionError, match="outside the prompt"):
        qk_attribution(model, transcoders, TOKENS, layer=1, head=0, query=9, key=0)
    with pytest.raises(AttributionError, match="does not exist"):
        qk_attribution(model, transcoders, TOKENS, layer=1, head=4, query=3, key=0)
