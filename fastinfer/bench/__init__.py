"""The `fastinfer bench` suites: ops.py (Int8Linear and int8_matmul_packed against PyTorch's CPU
peers, `--suite ops`/`dense`), interleaved.py (each layer right after a torch op, appended to the ops
suite), sparse.py (the sparse layers against dense and torch CSR, `--suite sparse`), models.py
(whole models, image models included, against bf16, torch.ao, ONNX Runtime and OpenVINO, `--suite
models`) and conv.py (single conv layers of the image models, Int8Conv2d vs fp32/bf16 nn.Conv2d,
`--suite conv`); cnn.py builds the image models; guard.py drops rounds in which another process
used the CPU. The pytest-benchmark files under bench/ at the repository root reuse them."""
