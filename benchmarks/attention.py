"""Fused attention with statistics vs torch SDPA, and statistics vs a materialised pattern.

GPU (CUDA): TFLOP/s of our kernel with and without statistics against SDPA's default dispatch and its flash
backend at N = 1k, 4k, 16k, d = 64/128, causal and not; time and peak memory of the statistics from the kernel
vs from a materialised softmax (O(N²)). CPU: run with TRITON_INTERPRET=1 at small N for correctness and
interpreter timings only (the interpreter is not a performance path).

    python benchmarks/attention.py                       # GPU sweep (or the CPU/interpreter check without one)
    python benchmarks/attention.py --seq 1024 --d 64     # one point
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int, cuda: bool) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn, cuda: bool) -> float:
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def materialised_statistics(q, k, scale, causal):
    from workbench.attention.reference import masked_scores, stats_from_scores

    return stats_from_scores(masked_scores(q, k, scale=scale, causal=causal, dtype=torch.float32))


def run_point(batch, heads, seq, d, causal, dtype, device, repeats) -> dict:
    from workbench.attention.kernel import flash_attention

    cuda = device == "cuda"
    q, k, v = (torch.randn(batch, heads, seq, d, device=device, dtype=dtype) for _ in range(3))
    scale = d**-0.5
    flops = 4 * batch * heads * seq * seq * d * (0.5 if causal else 1.0)
    contenders = {
        "ours (stats)": lambda: flash_attention(q, k, v, scale=scale, causal=causal, return_stats=True),
        "ours (no stats)": lambda: flash_attention(q, k, v, scale=scale, causal=causal, return_stats=False),
        "SDPA default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale),
    }
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

        contenders["SDPA flash backend"] = sdpa_flash
    row = {"seq": seq, "d": d, "causal": causal, "dtype": str(dtype).removeprefix("torch.")}
    for name, fn in contenders.items():
        seconds = timed(fn, repeats, cuda)
        row[name] = seconds
        row[f"{name} TFLOP/s"] = flops / seconds / 1e12
    fits = (batch * heads * seq * seq * 4) < (
        0.6 * torch.cuda.get_device_properties(0).total_memory if cuda else 2**31
    )
    if fits:
        row["materialised stats"] = timed(
            lambda: materialised_statistics(q, k, scale, causal), max(1, repeats // 2), cuda
        )
        row["materialised MiB"] = peak_memory(lambda: materialised_statistics(q, k, scale, causal), cuda)
    row["ours stats MiB"] = peak_memory(contenders["ours (stats)"], cuda)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, nargs="*")
    parser.add_argument("--d", type=int, nargs="*")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        from workbench.attention.kernel import kernel_available

        if not kernel_available(torch.device("cpu"))[0]:
            raise SystemExit(
                "no GPU: run with TRITON_INTERPRET=1 for the interpreter correctness/timing check"
            )
    seqs = args.seq or ([1024, 4096, 16384] if cuda else [64, 128])
    dims = args.d or [64, 128]
    batch, heads = args.batch or (4 if cuda else 1), args.heads or (16 if cuda else 2)
    repeats = args.repeats or (20 if cuda else 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(0) if cuda else "CPU (Triton interpreter)"
    print(f"device={name} torch={torch.__version__} batch={batch} heads={heads} dtype={dtype}")
    for d in dims:
        for seq in seqs:
            for causal in (False, True):
                row = run_point(batch, heads, seq, d, causal, dtype, device, repeats)
                line = f"N={seq:6d} d={d:3d} causal={causal!s:5s} "
                timings = [k for k in row if f"{k} TFLOP/s" in row]
                line += " ".join(f"{k}={row[k] * 1e3:.2f}ms/{row[f'{k} TFLOP/s']:.2f}TF" for k in timings)
                line += f" | stats-with-kernel/SDPA-default={row['SDPA default'] / row['ours (stats)']:.2f}x"
                if "SDPA flash backend" in row:
                    line += f" /SDPA-flash={row['SDPA flash backend'] / row['ours (stats)']:.2f}x"
                if "materialised stats" in row:
                    line += (f" | stats speedup vs materialised={row['materialised stats'] / row['ours (stats)']:.1f}x"
                             f" mem {row['ours stats MiB']:.0f} vs {row['materialised MiB']:.0f} MiB")  # fmt: skip
                print(line, flush=True)


if __name__ == "__main__":
    main()
