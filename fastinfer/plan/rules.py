"""When a layer runs faster sparse, and in which format: thresholds measured on real machines.

Whether a sparse layer beats the dense one depends on the density; the thresholds in SparseRule were
measured with bench/test_bench_sparse.py on the development machine (see bench/RESULTS.md) and are
meant to be re-measured, not trusted blindly, on very different CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastinfer import _runtime
from fastinfer._runtime import _C

__all__ = ["DEFAULT_RULE", "SparseRule", "choose_format"]


@dataclass(frozen=True)
class SparseRule:
    """When a pruned layer becomes sparse. Densities are fractions of nonzero weights (tiles for
    block). A layer denser than its format's limit stays dense.

    Measured on the development machine (AMD EPYC Zen 5, 2 threads, `fastinfer bench --suite
    sparse`, bench/RESULTS.md), 4096 x 4096 and 768 x 3072, M in {1, 16, 128, 512}:
      * fp32 "ell" (AVX-512; activations gathered in registers by vpermi2ps) vs dense fp32
        nn.Linear: faster at every M from 50% sparsity up (50%: 2.8x-4.4x at M = 1, 1.1x-1.2x at
        M >= 128; 90%: 8x-37x at M = 1, 4x at M = 512) -> fp32 layers with at most 50% nonzeros
        become SparseLinear("ell"); below AVX-512, fp32 "csr" up to 25% nonzeros (faster at every M
        from 75% sparsity up, mixed at 50%);
      * int8 "ell" (unstructured, activations gathered in registers by vpermi2b) vs the dense int8
        kernel: 1.4x-1.7x at M = 1 and 1.1x-1.2x at M >= 16 at 75% sparsity, 2.0x-3.1x at 90%,
        0.6x-0.97x at 50% -> chosen up to 25% nonzeros (needs AVX-512 VBMI);
      * int8 "csr" vs the dense int8 kernel: slower everywhere measured, even at 95% sparsity
        (0.3x-0.9x: per-nonzero memory gathers cost more than streaming 64 int8 weights per
        instruction) -> never chosen by default (int8_csr_max_density = 0);
      * int8 "block" (16 x 64 tiles): 1.2x-1.7x at 50% tile sparsity, 2.0x-2.9x at 75%, up to 9x
        at 95%, at every M -> chosen up to 60% nonzero tiles;
      * int8 "2:4": 1.3x-1.6x at M = 1 (40/64 of the weight bytes), 0.93x-1.01x at M = 16, ~0.93x
        at M >= 128 (the activation gather costs what the skipped multiplies save) -> chosen
        (int8_nm24=True) for decode-style use; set int8_nm24=False for models that mostly run
        large batches.
    """

    fp32_csr_max_density: float = 0.25
    fp32_ell_max_density: float = 0.5
    int8_ell_max_density: float = 0.25
    int8_csr_max_density: float = 0.0
    int8_block_max_tile_density: float = 0.6
    int8_nm24: bool = True

    def __post_init__(self) -> None:
        for name in ("fp32_csr_max_density", "fp32_ell_max_density", "int8_ell_max_density", "int8_csr_max_density",
                     "int8_block_max_tile_density"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                raise ValueError(f"SparseRule.{name} must be a number in [0, 1], got {v!r}")


DEFAULT_RULE = SparseRule()


def _is_nm24(w: torch.Tensor) -> bool:
    n, k = w.shape
    pad = (-k) % 4
    nz = (w != 0).to(torch.int8)
    if pad:
        nz = torch.nn.functional.pad(nz, (0, pad))
    return bool((nz.reshape(n, -1, 4).sum(-1) <= 2).all())


def _tile_density(w: torch.Tensor) -> float:
    n, k = w.shape
    tn, tk = 16, 64
    nz = (w != 0).to(torch.int8)
    nz = torch.nn.functional.pad(nz, (0, (-k) % tk, 0, (-n) % tn))
    tiles = nz.reshape(nz.shape[0] // tn, tn, nz.shape[1] // tk, tk).amax(dim=(1, 3))
    return float(tiles.float().mean()) if tiles.numel() else 1.0


def choose_format(weight: torch.Tensor, rule: SparseRule = DEFAULT_RULE) -> str | None:
    """The sparse format for this weight (float32 [N, K] -> "ell", "csr" or None; int8 -> "block",
    "ell", "2:4", "csr" or None), None meaning the dense layer is faster. Decided for the ISA active now."""
    if weight.dim() != 2 or weight.numel() == 0:
        return None
    density = float(torch.count_nonzero(weight)) / weight.numel()
    if weight.dtype != torch.int8:
        if _avx512() and density <= rule.fp32_ell_max_density and weight.shape[1] <= _FP32_ELL_MAX_K:
            return "ell"
        return "csr" if density <= rule.fp32_csr_max_density else None
    fast = _fast_int8_formats()
    if "block" in fast and _tile_density(weight) <= rule.int8_block_max_tile_density:
        return "block"
    if "ell" in fast and density <= rule.int8_ell_max_density:
        return "ell"
    if density <= rule.int8_csr_max_density:
        return "csr"
    if "2:4" in fast and rule.int8_nm24 and _is_nm24(weight):
        return "2:4"
    return None


_FP32_ELL_MAX_K = 1 << 20  # the fp32 ell window start is stored in 16 bits (units of 16 inputs)


def _avx512() -> bool:
    return _runtime.isa_at_least("avx512_vnni")


def _fast_int8_formats() -> set[str]:
    """int8 formats with a sparse-aware kernel on the active ISA. Elsewhere (avx2, ref) the formats
    run the dense kernel on decompressed panels (exact, but measured 0.1x-1.06x of dense on avx2),
    so sparsify keeps such layers dense."""
    if not _avx512():
        return set()
    return {"block", "2:4", "ell"} if _C.sparse_vbmi_active() else {"block"}
