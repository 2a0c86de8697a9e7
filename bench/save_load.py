"""Size, save time, load time and load memory of fastinfer.save / fastinfer.load for a BERT-base
shaped model (random weights; transformers built locally, no network).

    python bench/save_load.py [--layers 12]

The load runs in a fresh interpreter that first builds the float skeleton, so its peak RSS growth
is what loading the file costs on top of the float model a user would have anyway.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time

SETUP = """
import logging, resource, time, torch, transformers, fastinfer
logging.getLogger("fastinfer").setLevel(logging.WARNING)
transformers.logging.set_verbosity_error()
cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers={layers}, num_attention_heads=12, intermediate_size=3072)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bert.safetensors")
        code = SETUP.format(layers=args.layers) + textwrap.dedent(f"""
            torch.manual_seed(0)
            model = transformers.BertModel(cfg).eval()
            fp32 = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            q = fastinfer.quantize(model, fastinfer.QuantConfig(progress=False))
            t = time.perf_counter(); fastinfer.save(q, {path!r}); dt = time.perf_counter() - t
            print(f"fp32 state_dict {{fp32 / 2**20:.1f}} MiB; fastinfer file {{__import__('os').path.getsize({path!r}) / 2**20:.1f}} MiB; save {{dt:.2f}} s")
        """)  # fmt: skip
        subprocess.run([sys.executable, "-c", code], check=True, cwd=d)
        code = SETUP.format(layers=args.layers) + textwrap.dedent(f"""
            rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            skeleton = transformers.BertModel(cfg).eval()
            before = rss()
            t = time.perf_counter(); m = fastinfer.load({path!r}, skeleton); dt = time.perf_counter() - t
            print(f"load into the float skeleton {{dt:.2f}} s; peak RSS {{before:.0f}} -> {{rss():.0f}} MiB (+{{rss() - before:.0f}})")
        """)  # fmt: skip
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=d)
        print(f"(load child wall time {time.perf_counter() - t:.1f} s, with the torch import and the skeleton)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
