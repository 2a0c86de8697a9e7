"""examples/serve_embeddings.py: a worker loads a fastinfer folder, answers /health and /embed with
the embeddings the model gives in-process, refuses bad requests with 4xx, and leaves no process
behind when the server is terminated."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import fastinfer
from conftest import SUBPROCESS_CWD, subprocess_env

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _request(port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_embeddings_answers_like_the_model_in_process(tmp_path):
    transformers = pytest.importorskip("transformers")
    script = os.path.join(EXAMPLES, "serve_embeddings.py")
    assert os.path.isfile(script), f"{script} is missing (tests run beside the repository's examples/ folder)"
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, architectures=["BertModel"])  # fmt: skip
    torch.manual_seed(0)
    q = fastinfer.quantize(transformers.BertModel(cfg).eval())
    fastinfer.save_pretrained(q, tmp_path / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, script, str(tmp_path / "m"),
                               "--port", str(port)], stdout=subprocess.PIPE, text=True, cwd=SUBPROCESS_CWD,
                              env=subprocess_env({"FASTINFER_ISA": fastinfer.info()["isa"]}))  # fmt: skip
    # (the worker runs this process's ISA: the attention takes torch's SDPA where the ISA has no
    # kernel of its own, and the two agree to fp32 rounding, not bit for bit)
    try:
        line = server.stdout.readline()
        assert line.startswith(f"ready port={port} pids="), line
        worker = int(line.strip().split("pids=")[1])
        assert _request(port, "/health") == (200, {"ok": True, "kind": "fastinfer", "pid": worker})
        ids = [[5, 17, 33, 2, 0, 0], [9, 8, 7, 6, 5, 4]]
        mask = [[1, 1, 1, 1, 0, 0], [1] * 6]
        code, out = _request(port, "/embed", {"input_ids": ids, "attention_mask": mask})
        assert code == 200
        with torch.inference_mode():
            hidden = q(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        m = torch.tensor(mask).unsqueeze(-1).float()
        expected = ((hidden * m).sum(1) / m.sum(1)).tolist()
        assert out["embeddings"] == expected  # JSON floats round-trip exactly
        assert _request(port, "/embed", {"input_ids": [[500]]})[0] == 400  # id out of the vocabulary
        assert _request(port, "/embed", {"ids": [[1]]})[0] == 400
        assert _request(port, "/nothing")[0] == 404
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stdout.close()
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{worker}") and time.time() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{worker}"), "the worker outlived its server"
