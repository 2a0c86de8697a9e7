"""The `fastinfer bench` suites: ops.py (Int8Linear and int8_matmul_packed against PyTorch's CPU
peers, `--suite dense`) and sparse.py (the sparse layers against dense and torch CSR,
`--suite sparse`). The pytest-benchmark files under bench/ at the repository root reuse them."""
