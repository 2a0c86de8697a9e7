"""Serves sentence embeddings from a saved model folder over HTTP (standard library only).

    python examples/serve_embeddings.py MODEL_DIR [--port 8000] [--workers 2] [--threads 1]

MODEL_DIR is a folder written by fastinfer.save_pretrained (served int8) or by transformers'
save_pretrained (served in float, for comparison). Each worker process loads the model once at
startup (fastinfer re-packs the weights for the CPU it runs on), warms it up, and answers

    POST /embed   {"input_ids": [[101, 2023, ...], ...], "attention_mask": [[1, 1, ...], ...]}
                  -> {"embeddings": [[...], ...]}  (last hidden state, mean over the mask)
    GET  /health  -> {"ok": true, "kind": "fastinfer" | "float", "pid": ...}

Workers share the port through SO_REUSEPORT (the kernel spreads connections over them); they are
started with the spawn method, so none inherits the parent's OpenMP state. One request at a time
per worker: CPU inference gains nothing from threads fighting over the same cores. When every worker
is ready the server prints one line: `ready port=P pids=A,B`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

MAX_BODY = 4 << 20  # bytes; a larger request is refused (413)
MAX_TOKENS = 64 * 512  # input_ids per request


def load_model(model_dir: str):
    """(model, kind): fastinfer.from_pretrained for a fastinfer folder, else transformers' own."""
    import torch  # noqa: F401  (torch first: fastinfer joins its OpenMP runtime)

    if os.path.exists(os.path.join(model_dir, "fastinfer.safetensors")):
        import fastinfer

        return fastinfer.from_pretrained(model_dir).eval(), "fastinfer"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModel.from_pretrained(model_dir).eval(), "float"


def embed(model, input_ids, attention_mask=None):
    import torch

    ids = torch.tensor(input_ids, dtype=torch.long)
    if ids.dim() != 2 or ids.numel() == 0 or ids.numel() > MAX_TOKENS:
        raise ValueError(f"input_ids must be a non-empty [batch, tokens] list of at most {MAX_TOKENS} ids")
    mask = torch.ones_like(ids) if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long)
    if mask.shape != ids.shape:
        raise ValueError("attention_mask must have the shape of input_ids")
    vocab = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"input_ids must be in [0, {vocab})")
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).tolist()


class _ReusePortServer(HTTPServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _exit_with_parent(parent: int) -> None:
    """A worker outlives no server: it exits when its parent is gone (killed without cleanup)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _worker(model_dir: str, host: str, port: int, threads: int, ready, parent: int) -> None:
    _exit_with_parent(parent)
    import torch

    torch.set_num_threads(threads)
    model, kind = load_model(model_dir)
    embed(model, [[1] * 16])  # warm up: first-call packing and checks happen before serving

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: one line per request would be the bottleneck
            pass

        def _reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, {"ok": True, "kind": kind, "pid": os.getpid()})
            else:
                self._reply(404, {"error": "GET /health or POST /embed"})

        def do_POST(self) -> None:
            if self.path != "/embed":
                return self._reply(404, {"error": "POST /embed"})
            try:
                n = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                return self._reply(400, {"error": "bad Content-Length"})
            if n <= 0 or n > MAX_BODY:
                return self._reply(413, {"error": f"body must be 1..{MAX_BODY} bytes"})
            try:
                req = json.loads(self.rfile.read(n))
                out = embed(model, req["input_ids"], req.get("attention_mask"))
            except (ValueError, KeyError, TypeError) as e:
                return self._reply(400, {"error": f"{type(e).__name__}: {e}"})
            self._reply(200, {"embeddings": out})

    server = _ReusePortServer((host, port), Handler)
    ready.put((os.getpid(), server.server_address[1]))
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = ap.parse_args(argv)
    if args.port == 0 and args.workers > 1:
        ap.error("--port 0 (any free port) works with one worker only: the workers must share a port")
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(args.model_dir, args.host, args.port, args.threads, ready, os.getpid()),
                         daemon=True) for _ in range(args.workers)]  # fmt: skip
    for p in procs:
        p.start()

    def stop(signum, frame) -> None:  # SIGTERM: take the workers down too, then exit
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=10)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    got = []
    while len(got) < len(procs):
        try:
            got.append(ready.get(timeout=5))
        except Exception:  # noqa: BLE001 (queue.Empty: check the workers are still alive)
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                print(f"a worker exited during startup (exit {dead[0].exitcode})", file=sys.stderr)
                return 1
    print(f"ready port={got[0][1]} pids={','.join(str(pid) for pid, _ in got)}", flush=True)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
