"""The Triton kernel (interpreter on CPU) against torch SDPA and the float64 reference statistics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.attention import attend
from workbench.attention.kernel import flash_attention, kernel_available
from workbench.attention.reference import reference_attention

pytestmark = pytest.mark.skipif(
    not kernel_available(torch.device("cpu"))[0],
    reason="needs TRITON_INTERPRET=1 before import (set by make test)",
)


def _inputs(batch, heads, kv_heads, q_len, k_len, d_head, dtype, peak, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, d_head, generator=gen)
    k = torch.randn(batch, kv_heads, k_len, d_head, generator=gen)
    v = torch.randn(batch, kv_heads, k_len, d_head, generator=gen)
    if peak:  # a key that dominates every query: a peaked, sink-like distribution
        k[:, :, 0] = q.mean(dim=(1, 2), keepdim=False)[:, None] * peak
    return q.to(dtype), k.to(dtype), v.to(dtype)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]),
    q_len=st.integers(1, 37),
    extra_keys=st.integers(0, 20),
    d_head=st.sampled_from([32, 64, 128]),
    causal=st.booleans(),
    padded=st.booleans(),
    peak=st.sampled_from([0.0, 8.0]),
    sink_k=st.integers(0, 4),
    half=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_sdpa_and_float64_reference(batch, kv_heads, group, q_len, extra_keys, d_head, causal, padded,
                                                   peak, sink_k, half, seed) -> None:  # fmt: skip
    dtype = torch.float16 if half else torch.float32
    k_len = q_len + extra_keys
    q, k, v = _inputs(batch, kv_heads * group, kv_heads, q_len, k_len, d_head, dtype, peak, seed)
    mask = None
    if padded:
        mask = torch.rand(batch, k_len, generator=torch.Generator().manual_seed(seed + 1)) > 0.3
        if batch > 1:
            mask[0] = False  # a fully padded sequence: defined, never NaN
    scale = d_head**-0.5
    out, stats = flash_attention(
        q, k, v, scale=scale, causal=causal, key_padding_mask=mask, return_stats=True, sink_k=sink_k
    )
    ref_out, _, ref_stats = reference_attention(
        q, k, v, scale=scale, causal=causal, key_padding_mask=mask, sink_k=sink_k
    )
    tol = dict(atol=2e-3, rtol=2e-3) if half else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    sdpa = attend(q, k, v, scale=scale, causal=causal, key_padding_mask=mask, path="sdpa").out
    torch.testing.assert_close(out.float(), sdpa.float(), **tol)
    for name, value in stats.items():
        assert not torch.isnan(value).any(), name
        expected = ref_stats[name]
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isneginf(value), torch.isneginf(expected)), name
        torch.testing.assert_close(value.double()[finite], expected[finite], atol=2e-4, rtol=2e-4, msg=name)


def test_two_block_sizes_agree() -> None:
    q, k, v = _inputs(2, 4, 2, 45, 45, 64, torch.float32, 0.0, 7)
    small = flash_attention(q, k, v, scale=0.125, causal=True, return_stats=True, block_m=16, block_n=16)
    large = flash_attention(q, k, v, scale=0.125, causal=True, return_stats=True, block_m=32, block_n=64)
    torch.testing.assert_close(small[0], large[0], atol=1e-6, rtol=1e-5)
    for name in small[1]:
        torch.testing.assert_close(small[1][name], large[1][name], atol=1e-6, rtol=1e-5)


def test_fully_masked_rows_follow_the_documented_convention() -> None:
    q, k, v = _inputs(
        1, 2, 2, 6, 3, 32, torch.float32, 0.0, 3
    )  # causal with fewer keys: the first 3 rows see none
    out, stats = flash_attention(q, k, v, scale=0.2, causal=True, return_stats=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.isneginf(stats["lse"][:, :, :3]).all() and torch.isneginf(stats["max_logit"][:, :, :3]).all()
    assert (stats["entropy"][:, :, :3] == 0).all() and (stats["sink"][:, :, :3] == 0).all()
    assert torch.isfinite(stats["lse"][:, :, 3:]).all()


def test_pattern_on_the_kernel_path_explains_the_eager_path() -> None:
    q, k, v = _inputs(1, 2, 2, 4, 4, 32, torch.float32, 0.0, 1)
    with pytest.raises(ValueError, match="needs the materialised pattern.*eager path"):
        attend(q, k, v, scale=0.2, causal=True, path="kernel", return_pattern=True)


def test_fallback_without_interpreter_or_gpu_logs_and_matches(caplog, monkeypatch) -> None:
    import workbench.attention.kernel as kernel

    monkeypatch.setattr(kernel, "_INTERPRETED", False)
    monkeypatch.setattr(kernel, "_announced", set())
    q, k, v = _inputs(1, 2, 1, 9, 9, 32, torch.float32, 0.0, 2)
    with caplog.at_level("WARNING"):
        out, stats = flash_attention(q, k, v, scale=0.2, causal=True, return_stats=True)
    assert "fallback" in caplog.text and "TRITON_INTERPRET" in caplog.text
    ref_out, _, ref_stats = reference_attention(q, k, v, scale=0.2, causal=True)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["entropy"].double(), ref_stats["entropy"], atol=1e-5, rtol=1e-5)
