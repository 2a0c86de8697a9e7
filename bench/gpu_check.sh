#!/usr/bin/env bash
# One prepared GPU check (meant to finish in under 8 minutes on an H200): build fastinfer with the CUDA
# backend required, run the `cuda` tests against the installed package, measure the ceilings and our
# kernels, and write a markdown table to ${OUT:-bench}/gpu_results.md.
# Needs on the GPU machine: a CUDA build of torch, nvcc, and the build tools (scikit-build-core,
# pybind11, cmake, ninja) importable by python3 (carry them as wheels where there is no network).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$repo/bench}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

echo "== build (FASTINFER_CUDA=ON)"
timeout 300 "$py" -m pip install -q --no-build-isolation --no-deps -Ccmake.define.FASTINFER_CUDA=ON "$repo"
work=$(mktemp -d)
cp -r "$repo/tests" "$repo/pyproject.toml" "$work/"
cd "$work"
"$py" -c "import fastinfer, json; print(json.dumps(fastinfer.info()['cuda']))"

echo "== cuda tests"
timeout 240 "$py" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log"

echo "== measurements"
timeout 240 "$py" "$repo/bench/gpu_bench.py" --output "$out/gpu_results.md"
