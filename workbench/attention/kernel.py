"""Fused flash attention in Triton that also returns per-(batch, head, query) statistics, in O(N) memory.

One program handles ``BLOCK_M`` queries of one (batch, head) and streams key/value blocks. Besides the usual
running max ``m`` and normaliser ``l`` it keeps, rescaled by the same factor whenever ``m`` grows:
``t = Σ exp(s − m)·s`` (for the entropy ``H = lse − t/l``) and ``z = Σ_{j<sink_k} exp(s − m)`` (for the sink
mass ``z/l``). Scores are handled in base 2 (``exp2``) with the softmax scale folded in, and converted back to
natural units at the end. Definitions and the fully-masked-row convention are in
:mod:`workbench.attention.reference`.

Runs on CUDA GPUs, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set before import; fp32 and
fp16 only there). Block sizes are fixed per (head dim, dtype): nothing is autotuned and no driver is touched at
import. When the kernel cannot run, :func:`flash_attention` falls back to torch SDPA plus the reference
statistics and logs once which path runs.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from workbench.attention.reference import sdpa, sdpa_with_statistics

log = logging.getLogger(__name__)
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2

try:  # triton is optional: without it every call takes the fallback path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_announced: set[str] = set()


def _announce(path: str, reason: str) -> None:
    if path not in _announced:
        _announced.add(path)
        log.warning("workbench attention: %s (%s)", path, reason)


if triton is not None:

    @triton.jit
    def _flash_stats_kernel(
        Q,
        K,
        V,
        Out,
        PAD,
        LSE,
        MAXL,
        ENT,
        SINK,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        stride_pb,
        stride_sb,
        stride_sh,
        n_heads,
        kv_group,
        q_len,
        k_len,
        d_head,
        qk_scale,
        sink_k,
        CAUSAL: tl.constexpr,
        HAS_PAD: tl.constexpr,
        STATS: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // n_heads
        h = bh % n_heads
        kvh = h // kv_group
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < q_len
        d_valid = offs_d < d_head
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=m_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        t_i = tl.zeros([BLOCK_M], tl.float32)
        z_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        shift = k_len - q_len
        hi = k_len
        if CAUSAL:
            hi = tl.minimum(k_len, (start_m + 1) * BLOCK_M + shift)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < k_len
            k = tl.load(
                k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=n_valid[None, :] & d_valid[:, None],
                other=0.0,
            )
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee") * qk_scale
            else:
                s = tl.dot(q, k) * qk_scale
            allowed = n_valid[None, :] & m_valid[:, None]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + shift)
            if HAS_PAD:
                keep = tl.load(PAD + b * stride_pb + cols, mask=n_valid, other=0)
                allowed = allowed & (keep[None, :] != 0)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if STATS:
                t_i = t_i * alpha + tl.sum(p * tl.where(allowed, s, 0.0), 1)
                in_sink = (cols < sink_k)[None, :]
                z_i = z_i * alpha + tl.sum(tl.where(in_sink, p, 0.0), 1)
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(
            Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
            out.to(Out.dtype.element_ty),
            mask=m_valid[:, None] & d_valid[None, :],
        )
        if STATS:
            row = b * stride_sb + h * stride_sh + offs_m
            lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
            entropy = tl.where(empty, 0.0, (lse2 - t_i / l_safe) * 0.6931471805599453)
            tl.store(LSE + row, lse2 * 0.6931471805599453, mask=m_valid)
            tl.store(MAXL + row, m_i * 0.6931471805599453, mask=m_valid)
            tl.store(ENT + row, tl.maximum(entropy, 0.0), mask=m_valid)
            tl.store(SINK + row, tl.where(empty, 0.0, z_i / l_safe), mask=m_valid)


def block_config(d_head: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim and dtype: small fixed blocks in the
    interpreter, a fixed table on GPUs."""
    if interpreted:
        return 16, 16, 1, 1
    if d_head <= 64:
        return (128, 64, 4, 3) if dtype != torch.float32 else (64, 32, 4, 2)
    return (128, 64, 8, 2) if dtype != torch.float32 else (32, 32, 4, 2)


def kernel_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernel can run for tensors on ``device``, and why not."""
    if triton is None:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, "Triton kernel on CUDA"
    if device.type == "cpu" and _INTERPRETED:
        return True, "Triton kernel in the interpreter (TRITON_INTERPRET=1)"
    return False, f"no GPU for tensors on {device} and TRITON_INTERPRET=1 was not set before import"


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    return_stats: bool = False,
    sink_k: int = 1,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Attention of q [batch, heads, q_len, d] over k, v [batch, kv_heads, k_len, d].

    Returns (out [batch, heads, q_len, d] in q's dtype, stats or None) where stats maps "entropy", "sink", "lse",
    "max_logit" to float32 [batch, heads, q_len]. ``key_padding_mask`` [batch, k_len] is True for real keys.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [b, h, q, d] and k, v [b, kv_h, k, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, heads, q_len, d_head = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} key/value heads")
    if sink_k < 0:
        raise ValueError(f"sink_k must be >= 0, got {sink_k}")
    ok, reason = kernel_available(q.device)
    if not ok:
        _announce("torch SDPA with reference statistics (fallback)", reason)
        if not return_stats:
            return sdpa(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask), None
        return sdpa_with_statistics(
            q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask, sink_k=sink_k
        )
    _announce("Triton flash attention with in-kernel statistics", reason)
    bm, bn, warps, stages = block_config(d_head, q.dtype, q.device.type == "cpu")
    bm, bn = block_m or bm, block_n or bn
    out = torch.empty_like(q)
    stat_shape = (batch, heads, q_len) if return_stats else (1, 1, 1)
    buffers = [torch.empty(stat_shape, device=q.device, dtype=torch.float32) for _ in range(4)]
    pad = (
        key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
        if key_padding_mask is not None
        else out
    )
    grid = (triton.cdiv(q_len, bm), batch * heads)
    _flash_stats_kernel[grid](
        q,
        k,
        v,
        out,
        pad,
        *buffers,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        pad.stride(0) if key_padding_mask is not None else 0,
        buffers[0].stride(0),
        buffers[0].stride(1),
        heads,
        heads // kv_heads,
        q_len,
        k_len,
        d_head,
        scale * LOG2E,
        sink_k,
        CAUSAL=causal,
        HAS_PAD=key_padding_mask is not None,
        STATS=return_stats,
        IEEE=q.dtype == torch.float32,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=max(16, triton.next_power_of_2(d_head)),
        num_warps=warps,
        num_stages=stages,
    )
    if not return_stats:
        return out, None
    return out, dict(zip(("lse", "max_logit", "entropy", "sink"), buffers, strict=True))
