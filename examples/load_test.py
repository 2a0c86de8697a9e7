"""Load test of examples/serve_embeddings.py: float vs fastinfer, 1 and 2 worker processes.

    python examples/load_test.py [--requests 100] [--concurrency 4] [--batch 8] [--tokens 128]

Builds a MiniLM-shaped encoder locally (6 layers, hidden 384, random weights, no network), saves
it as a float transformers folder and as a fastinfer folder, then for each (model, workers) starts
the server on a loopback port, sends the same requests from `concurrency` client threads (one
connection per request, so the kernel spreads them over the workers) and reports throughput and
p50 / p99 latency, plus the cosine of the fastinfer embeddings to the float ones. Bounded: a fixed
number of requests, each with a timeout, loopback only. The workers split the machine's cores
(torch threads = cores / workers). The client runs on the same cores: its share of the CPU is
printed. Where another process used more than 10% of the machine during a run, that run's figures
are replaced by the share it took.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
HZ = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / HZ


def _proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / HZ
    except OSError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_models(d: str) -> tuple[str, str]:
    import torch
    import transformers

    import fastinfer

    transformers.logging.set_verbosity_error()
    cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                                  architectures=["BertModel"])  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    float_dir, fi_dir = os.path.join(d, "float"), os.path.join(d, "fastinfer")
    model.save_pretrained(float_dir)
    fastinfer.save_pretrained(fastinfer.quantize(model, fastinfer.QuantConfig(progress=False)), fi_dir)
    return float_dir, fi_dir


def _post(port: int, body: bytes, timeout: float) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/embed", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_case(model_dir: str, workers: int, bodies: list[bytes], concurrency: int, timeout: float) -> dict:
    cores = os.cpu_count() or 1
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "serve_embeddings.py"), model_dir, "--port", str(port),
         "--workers", str(workers), "--threads", str(max(1, cores // workers))],
        stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"the server did not start: {line!r}")
        pids = [int(p) for p in line.split("pids=")[1].split(",")]
        for body in bodies[:4]:  # warm-up, untimed
            _post(port, body, timeout)
        first = _post(port, bodies[0], timeout)["embeddings"]
        latencies: list[float] = []
        lock = threading.Lock()
        todo = list(range(len(bodies)))

        def client() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                t0 = time.perf_counter()
                _post(port, bodies[i], timeout)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)

        busy0, own0 = _machine_busy_s(), os.times()
        srv0 = sum(_proc_cpu_s(p) for p in pids)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        own1 = os.times()
        client_cpu = (own1.user - own0.user) + (own1.system - own0.system)
        server_cpu = sum(_proc_cpu_s(p) for p in pids) - srv0
        foreign = max(0.0, _machine_busy_s() - busy0 - client_cpu - server_cpu) / (wall * cores)
        lat = sorted(latencies)
        return {
            "throughput": len(lat) / wall, "p50": statistics.median(lat) * 1e3,
            "p99": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] * 1e3,
            "client_share": client_cpu / (wall * cores), "foreign": foreign, "first": first,
        }  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="sequences per request")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    args = ap.parse_args(argv)
    import random

    rng = random.Random(0)
    bodies = [json.dumps({"input_ids": [[rng.randrange(1000, 30000) for _ in range(args.tokens)]
                                        for _ in range(args.batch)]}).encode() for _ in range(args.requests)]  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        float_dir, fi_dir = build_models(d)
        rows, firsts = [], {}
        for workers in (1, 2):
            for name, model_dir in (("float (fp32)", float_dir), ("fastinfer int8", fi_dir)):
                r = run_case(model_dir, workers, bodies, args.concurrency, args.timeout)
                firsts[name] = r["first"]
                rows.append((name, workers, r))
    print(f"MiniLM-shaped encoder, {args.batch} x {args.tokens} tokens per request, {args.requests} requests, "
          f"{args.concurrency} client threads, {os.cpu_count()} cores\n")  # fmt: skip
    print("| model | workers | requests/s | p50 ms | p99 ms | client CPU share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = {}
    for name, workers, r in rows:
        if r["foreign"] > 0.10:
            print(f"| {name} | {workers} | another process used {r['foreign']:.0%} of the CPU: not printed | | | |")
            continue
        base.setdefault(workers, {})[name] = r["throughput"]
        print(f"| {name} | {workers} | {r['throughput']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['client_share']:.0%} |")
    for workers, by in base.items():
        if len(by) == 2:
            print(f"\n{workers} worker(s): fastinfer / float throughput {by['fastinfer int8'] / by['float (fp32)']:.2f}x", end="")
    import math

    a, b = firsts["fastinfer int8"], firsts["float (fp32)"]
    cos = [sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v)) for u, v in zip(a, b)]
    print(f"\nembedding cosine fastinfer vs float (first request): min {min(cos):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
