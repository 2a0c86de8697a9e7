"""GPU measurements for bench/gpu_check.sh: ceilings, then fastinfer's kernels, as a markdown table.

Ceilings in the same run: device copy bandwidth (read + write of 1 GiB), read bandwidth (sum of
1 GiB), bf16 torch.matmul and torch._int_mm at 8192^3. Ours at (M, 8192, 8192) for M in
1, 16, 4096, 8192: int8_matmul_packed (integer-only, vs torch._int_mm) and Int8Linear (bf16 in/out,
activation quantization included, vs bf16 nn.Linear). Results are checked before timing (exact vs
torch._int_mm or the int64 reference). Then 2:4: sparse_int8_matmul (mma.sp, or the dp4a kernel
at M <= 16) on a 2:4-pruned copy of the same weight vs our dense int8_matmul_packed (the issue's
target: >= 1.3x at M >= 512), torch's semi-structured int8 (cuSPARSELt / CUTLASS) where it runs,
and the 2:4 weight bytes per second. Times: CUDA events, median of 20 after 5 warm-up calls.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import fastinfer
from fastinfer import ops


def cuda_ms(fn, reps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output", default="bench/gpu_results.md")
    args = p.parse_args()
    dev = torch.device("cuda")
    rows: list[str] = []
    big = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_gbs = 2 * big.numel() / cuda_ms(lambda: dst.copy_(big)) / 1e6
    f32 = big.view(torch.float32)
    read_gbs = big.numel() / cuda_ms(lambda: f32.sum()) / 1e6
    del dst
    n = k = 8192
    a16 = torch.randn(8192, k, device=dev, dtype=torch.bfloat16)
    b16 = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
    bf16_tflops = 2 * 8192 * n * k / cuda_ms(lambda: a16 @ b16) / 1e9
    a8 = torch.randint(-128, 128, (8192, k), dtype=torch.int8, device=dev)
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev)
    intmm_tops = 2 * 8192 * n * k / cuda_ms(lambda: torch._int_mm(a8, w8.T)) / 1e9
    rows.append(f"- {torch.cuda.get_device_name(0)}; torch {torch.__version__}; fastinfer {fastinfer.__version__}")
    rows.append(f"- ceilings (this run): copy {copy_gbs:.0f} GB/s (read + write), read {read_gbs:.0f} GB/s, "
                f"bf16 matmul {bf16_tflops:.0f} TFLOPS, torch._int_mm {intmm_tops:.0f} TOPS (8192^3)")  # fmt: skip
    rows += ["", "| M x K x N | ours int8_matmul_packed | vs torch._int_mm | ours Int8Linear (bf16) | vs bf16 nn.Linear | weight GB/s (% of read) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    packed = ops.pack_int8_weight(w8)
    lin = nn.Linear(k, n, bias=True).to(dev)
    q = fastinfer.quantize(nn.Sequential(lin)).to(dev)
    lin16 = nn.Linear(k, n, bias=True).to(dev, torch.bfloat16)
    for m in (1, 16, 4096, 8192):
        a = a8[:m]
        got = ops.int8_matmul_packed(a, packed, n)
        if m > 16:
            assert torch.equal(got, torch._int_mm(a, w8.T)), "int8_matmul_packed differs from torch._int_mm"
        else:
            ref = (a.double() @ w8.double().T).round().int()  # exact: |sums| < 2^53
            assert torch.equal(got, ref), "int8_matmul_packed differs from the exact reference"
        t_ours = cuda_ms(lambda: ops.int8_matmul_packed(a, packed, n))
        t_int = cuda_ms(lambda: torch._int_mm(a, w8.T)) if m > 16 else float("nan")
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            t_lin = cuda_ms(lambda: q(x))
            t_b16 = cuda_ms(lambda: lin16(x))
        tops = 2 * m * n * k / t_ours / 1e9
        gbs = n * k / t_lin / 1e6
        rows.append(
            f"| {m}x{k}x{n} | {t_ours:.3f} ms, {tops:.1f} TOPS | {t_int / t_ours:.2f}x | {t_lin:.3f} ms | "
            f"{t_b16 / t_lin:.2f}x | {gbs:.0f} ({gbs / read_gbs * 100:.0f}%) |"
        )
    rows += ["", "| 2:4, M x K x N | ours sparse_int8_matmul | vs ours dense | vs torch semi-structured int8 | 2:4 weight GB/s (% of read) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    w24 = w8.clone().view(n, k // 4, 4)
    w24[..., 2:] = 0  # keep 2 of every 4 (positions vary below)
    w24 = w24.view(n, k)
    w24 = torch.roll(w24, shifts=1, dims=1)  # kept positions 1, 2 of each group
    packed24 = ops.pack_sparse(w24, "2:4")
    try:
        from torch.sparse import to_sparse_semi_structured

        w24_torch = to_sparse_semi_structured(w24)
    except Exception as e:  # noqa: BLE001  (a peer that does not run here is reported, not fatal)
        w24_torch, why = None, f"{type(e).__name__}: {e}"
    for m in (1, 16, 512, 4096, 8192):
        a = a8[:m]
        got = ops.sparse_int8_matmul(a, packed24, n)
        ref = torch._int_mm(a, w24.T) if m > 16 else (a.double() @ w24.double().T).round().int()
        assert torch.equal(got, ref), "sparse_int8_matmul differs from the exact reference"
        t_sp = cuda_ms(lambda: ops.sparse_int8_matmul(a, packed24, n))
        t_dense = cuda_ms(lambda: ops.int8_matmul_packed(a, packed, n))
        peer = "n/a"
        if w24_torch is not None and m >= 32:
            try:
                t_peer = cuda_ms(lambda: torch.mm(w24_torch, a.T))
                peer = f"{t_peer / t_sp:.2f}x"
            except Exception as e:  # noqa: BLE001
                peer = f"fails: {type(e).__name__}"
        gbs = (n * k // 2 + n * k // 8) / t_sp / 1e6
        rows.append(f"| {m}x{k}x{n} | {t_sp:.3f} ms, {2 * m * n * k / t_sp / 1e9:.1f} dense-equivalent TOPS | "
                    f"{t_dense / t_sp:.2f}x | {peer} | {gbs:.0f} ({gbs / read_gbs * 100:.0f}%) |")  # fmt: skip
    if w24_torch is None:
        rows.append(f"- torch semi-structured int8 did not run: {why}")
    text = "## GPU results (bench/gpu_check.sh)\n\n" + "\n".join(rows) + "\n"
    print(text)
    with open(args.output, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
