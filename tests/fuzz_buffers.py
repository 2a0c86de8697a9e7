"""Mutation fuzzing of the buffers the kernels read: dense packed int8 weights (K4N16) and every
sparse format. A mutated buffer must either raise ValueError/TypeError, or be accepted and then give
the one right answer on every kernel table this CPU has (the int8 products exactly equal to the
int64 product of what unpack returns; fp32 products within rounding of the float64 product). It
must never crash the interpreter.

Each batch runs in a child process (a crash is caught, with the number of the mutation that did it,
and the run goes on). Every mutation is drawn from (seed, batch, index), so a failure reproduces:

    python tests/fuzz_buffers.py --seconds 60            # time-boxed run, every target, report
    python tests/fuzz_buffers.py --target csr-f32 --batch 3 --only 17   # replay one mutation (prints it)
    python tests/fuzz_buffers.py --atheris --seconds 60  # atheris as the mutation engine, if installed

Run from outside the source tree (the tests do), so the installed fastinfer is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

TARGETS = ("dense", "csr-f32", "ell-f32", "csr-i8", "2:4", "block", "ell-i8")
OUTCOMES = ("raised", "correct", "correct_large", "wrong", "other_error", "crash")
# Accepted buffers declaring more weights than this are checked through unpack and the nonzero
# count only (no products: an accepted [1, 2^26] csr would need 256 MB inputs).
LARGE = 1 << 22
INTERESTING = (0, 1, -1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32,
               2**40, 2**40 + 1, 2**62, 2**63 - 1, -(2**63))  # fmt: skip


# ------------------------------------------------------------------------------ the seed buffers


def sparse_int8_weight(fmt: str, n: int, k: int, density: float, g) -> "torch.Tensor":  # noqa: F821
    """int8 [n, k] in [-127, 127] with the zero pattern fmt stores: 2:4 groups, 16 x 64 tiles, or any
    (drawn from the torch.Generator g; tests/conftest.py's sparse_int8 is this with a seed)."""
    import torch

    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    if fmt == "2:4":
        kk = (k + 3) // 4 * 4
        keep = torch.rand(n, kk // 4, 4, generator=g).argsort(-1) < 2
        return w * keep.reshape(n, kk)[:, :k]
    if fmt == "block":
        tiles = torch.rand((n + 15) // 16, (k + 63) // 64, generator=g) < density
        return w * tiles.repeat_interleave(16, 0)[:n].repeat_interleave(64, 1)[:, :k]
    return w * (torch.rand(n, k, generator=g) < density)


def _seeds():
    """target -> list of (description, packed buffer as bytes): what pack_int8_weight / pack_sparse
    write for a few shapes (odd N and K, one block, K past 64-byte and 65,536-index boundaries)."""
    import torch

    from fastinfer import ops

    g = torch.Generator().manual_seed(1234)

    def int8(n, k, density, pattern="csr"):
        return sparse_int8_weight(pattern, n, k, density, g)

    def f32(n, k, density):
        return torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)

    def raw(t):
        return bytes(t.numpy().tobytes())

    shapes = [(20, 60), (33, 130), (16, 64), (1, 1)]
    out = {"dense": [(f"dense {n}x{k}", raw(ops.pack_int8_weight(int8(n, k, 1.0)))) for n, k in shapes]}
    for target, fmt, make in (
        ("csr-f32", "csr", lambda n, k: f32(n, k, 0.2)),
        ("ell-f32", "ell", lambda n, k: f32(n, k, 0.2)),
        ("csr-i8", "csr", lambda n, k: int8(n, k, 0.2)),
        ("2:4", "2:4", lambda n, k: int8(n, k, 0.5, "2:4")),
        ("block", "block", lambda n, k: int8(n, k, 0.4, "block")),
        ("ell-i8", "ell", lambda n, k: int8(n, k, 0.2)),
    ):
        out[target] = [(f"{fmt} {n}x{k}", raw(ops.pack_sparse(make(n, k), fmt))) for n, k in shapes[:3]]
    out["csr-f32"].append(("csr 3x70000 (int32 indices)", raw(ops.pack_sparse(f32(3, 70000, 0.001), "csr"))))
    return out


# ----------------------------------------------------------------------------------- mutations


def mutate(buf: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """1 to 4 edits of buf: bit flips, byte values, interesting 4- and 8-byte words (header fields,
    pointers, sums, indices), chunk copies, truncation and extension. Returns the new buffer and
    what was done (for the report)."""
    b = bytearray(buf)
    done = []
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.25 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
            done.append(f"flip@{i}")
        elif op < 0.40 and b:
            i = rng.randrange(len(b))
            b[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
            done.append(f"byte@{i}")
        elif op < 0.70 and len(b) >= 8:
            # header fields most often (the first 64 bytes), else anywhere, 8-aligned
            i = rng.randrange(0, min(len(b), 64) - 7 if rng.random() < 0.6 else len(b) - 7)
            i -= i % (8 if rng.random() < 0.7 else 4)
            width = 8 if i + 8 <= len(b) and rng.random() < 0.6 else 4
            old = int.from_bytes(b[i : i + width], "little", signed=True)
            v = rng.choice(INTERESTING + (old + 1, old - 1, old * 2, old + 16, old + 64, -old))
            v = ((v + 2 ** (8 * width - 1)) % 2 ** (8 * width)) - 2 ** (8 * width - 1)
            b[i : i + width] = v.to_bytes(width, "little", signed=True)
            done.append(f"int{8 * width}@{i}={v}")
        elif op < 0.80 and len(b) > 2:
            n = rng.randrange(1, min(256, len(b)))
            src, dst = rng.randrange(len(b) - n + 1), rng.randrange(len(b) - n + 1)
            b[dst : dst + n] = b[src : src + n]
            done.append(f"copy{n}@{src}->{dst}")
        elif op < 0.90 and b:
            cut = rng.choice((1, 4, 8, 64, rng.randrange(1, len(b) + 1)))
            del b[max(0, len(b) - cut) :]
            done.append(f"truncate{cut}")
        else:
            extra = rng.choice((1, 4, 8, 64, rng.randrange(1, 512)))
            b += bytes(extra) if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(extra))
            done.append(f"extend{extra}")
    return bytes(b), done


# ---------------------------------------------------------------------------------- the oracle


class Oracle:
    """check(target, buffer) -> outcome, for one process (imports torch and fastinfer once)."""

    def __init__(self) -> None:
        import torch

        import fastinfer
        from fastinfer import _C, ops

        self.torch, self.fastinfer, self.C, self.ops = torch, fastinfer, _C, ops
        isas = fastinfer.available_isas()
        self.variants = [(isa, True) for isa in isas]
        if "avx512_vnni" in isas and _C.cpu_flags()["avx512_vbmi"]:
            self.variants.append(("avx512_vnni", False))  # VNNI without the VBMI sparse kernels

    def _use(self, isa, vbmi):
        self.fastinfer.set_isa(isa)
        self.C.set_sparse_vbmi(vbmi)

    def _tensor(self, data: bytes):
        t = self.torch.frombuffer(bytearray(data), dtype=self.torch.uint8) if data else self.torch.empty(0, dtype=self.torch.uint8)
        out = self.torch.empty(t.numel(), dtype=self.torch.uint8)  # 64-byte aligned (torch's allocator)
        return out.copy_(t)

    def check(self, target: str, data: bytes) -> str:
        torch, ops = self.torch, self.ops
        p = self._tensor(data)
        try:
            w = ops.unpack_int8_weight(p) if target == "dense" else ops.unpack_sparse(p)
        except (ValueError, TypeError):
            return "raised"
        except Exception:  # noqa: BLE001  (any other exception type is a finding)
            return "other_error"
        try:
            if target != "dense" and ops.sparse_nonzeros(p) != int(torch.count_nonzero(w)):
                return "wrong"
            n, k = w.shape
            if n * k > LARGE or k > (1 << 20):
                return "correct_large"
            g = torch.Generator().manual_seed(n * 31 + k)
            if w.dtype == torch.int8:
                a = torch.randint(-128, 128, (3, k), dtype=torch.int8, generator=g)
                want = (a.long() @ w.long().T) if k else torch.zeros(3, n, dtype=torch.long)
                want = (((want + 2**31) % 2**32) - 2**31).to(torch.int32)
                for v in self.variants:
                    self._use(*v)
                    got = ops.int8_matmul_packed(a, p, n) if target == "dense" else ops.sparse_int8_matmul(a, p, n)
                    if not torch.equal(got, want):
                        return "wrong"
            else:
                x = torch.randn(3, k, generator=g)
                if not bool(torch.isfinite(w).all()):
                    return "wrong"  # validation lets no NaN or Inf through (pack_sparse refuses them)
                want = (x.double() @ w.double().T) if k else torch.zeros(3, n, dtype=torch.float64)
                mag = x.abs().double() @ w.abs().double().T
                bound = 1e-5 * mag + 1e-6
                fits = mag < 1e38  # fp32 sums of huge stored values may overflow: not compared
                for v in self.variants:
                    self._use(*v)
                    got = ops.sparse_linear(x, p, None, n).double()
                    if not bool(((got - want).abs() <= bound)[fits].all()):
                        return "wrong"
            return "correct"
        except (ValueError, TypeError):
            return "wrong"  # accepted by unpack, then refused by a product: the checks disagree
        except Exception:  # noqa: BLE001
            return "other_error"
        finally:
            self._use(self.variants[-1][0], True)


# ------------------------------------------------------------------------------ child and parent


def _rng(seed: int, target: str, batch: int, index: int) -> random.Random:
    return random.Random(f"{seed}/{target}/{batch}/{index}")


def run_batch(targets, seed: int, batch: int, start: int, count: int, only: int | None = None) -> None:
    """Child: mutations [start, start + count) of (seed, target, batch) for each target in turn (start
    applies to the first one only; later ones begin at 0). To stderr, "@target i" before each one and
    "=target i outcome" after it, so a parent knows every outcome up to a crash and which mutation
    crashed; findings (wrong results) as "!{json}" lines."""
    all_seeds = _seeds()
    oracle = Oracle()
    crash_at = os.environ.get("FASTINFER_FUZZ_SELFTEST_CRASH")
    for n, target in enumerate(targets):
        seeds = all_seeds[target]
        first = start if n == 0 else 0
        for i in range(first, count) if only is None else (only,):
            rng = _rng(seed, target, batch, i)
            name, base = seeds[rng.randrange(len(seeds))]
            data, edits = mutate(base, rng)
            print(f"@{target} {i}", file=sys.stderr, flush=True)
            if crash_at == f"{target}:{i}":  # the harness's own test: a crash must be caught
                os.kill(os.getpid(), signal.SIGSEGV)
            outcome = oracle.check(target, data)
            print(f"={target} {i} {outcome}", file=sys.stderr, flush=True)
            if outcome in ("wrong", "other_error"):
                finding = {"target": target, "index": i, "seed_buffer": name, "edits": edits, "outcome": outcome}
                print("!" + json.dumps(finding), file=sys.stderr, flush=True)


def _child(targets, seed: int, batch: int, start: int, count: int, timeout: float):
    """Runs one batch in a child: (outcome counts, findings, where to go on from: None when done, else
    (index of the target that crashed, next mutation))."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--seed", str(seed), "--batch", str(batch),
           "--start", str(start), "--count", str(count)]  # fmt: skip
    for t in targets:
        cmd += ["--target", t]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        err, code = r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        code = "hang"
    counts = dict.fromkeys(OUTCOMES, 0)
    findings, started, finished = [], None, set()
    for ln in err.splitlines():
        if ln.startswith("@"):
            target, i = ln[1:].rsplit(" ", 1)
            started = (target, int(i))
        elif ln.startswith("="):
            target, i, outcome = ln[1:].rsplit(" ", 2)
            counts[outcome] += 1
            finished.add((target, int(i)))
        elif ln.startswith("!"):
            findings.append(json.loads(ln[1:]))
    if code == 0:
        return counts, findings, None
    if started is None or started in finished:  # died outside a mutation (import, seeds)
        raise RuntimeError(f"fuzz child failed ({code}): {err.strip()[-2000:]}")
    why = "hang" if code == "hang" else (signal.Signals(-code).name if code < 0 else f"exit {code}")
    counts["crash"] += 1
    findings.append({"target": started[0], "index": started[1], "outcome": "crash", "why": why,
                     "stderr": err.strip()[-400:]})  # fmt: skip
    return counts, findings, (list(targets).index(started[0]), started[1] + 1)


def fuzz(seconds: float, seed: int = 0, targets=TARGETS, batch_size: int = 150, progress: bool = True) -> dict:
    """Parent: batches of batch_size mutations of every target, each batch in one child, until the
    time is up (at least one batch). Returns {"tried", "counts", "findings", "seconds", "seed"}."""
    t0 = time.monotonic()
    counts = dict.fromkeys(OUTCOMES, 0)
    findings = []
    batch = 0
    while batch == 0 or time.monotonic() - t0 < seconds:
        todo, start = list(targets), 0
        while todo:
            got, found, resume = _child(todo, seed, batch, start, batch_size, timeout=max(300.0, 2 * seconds))
            for key, v in got.items():
                counts[key] += v
            findings += [dict(f, batch=batch) for f in found]
            if resume is None:
                break
            todo, start = todo[resume[0] :], resume[1]
            if start >= batch_size:
                todo, start = todo[1:], 0
        batch += 1
        if progress:
            print(f"fuzz: {sum(counts.values())} mutations, {time.monotonic() - t0:.0f} s, {counts}",
                  file=sys.stderr, flush=True)  # fmt: skip
    return {"tried": sum(counts.values()), "counts": counts, "findings": findings,
            "seconds": round(time.monotonic() - t0, 1), "seed": seed}  # fmt: skip


# --------------------------------------------------------------------------------------- atheris


def run_atheris(seconds: float, seed: int) -> None:
    """atheris as the mutation engine (coverage of the Python checks; the C++ is not instrumented):
    the input picks a target and a seed buffer, then its bytes drive the same mutations. A wrong
    result raises AssertionError, which atheris reports with the input that caused it."""
    import atheris

    with atheris.instrument_imports(include=["fastinfer"]):  # coverage of the Python checks
        import fastinfer  # noqa: F401
    seeds = _seeds()
    oracle = Oracle()
    counts = dict.fromkeys(OUTCOMES, 0)
    t_end = time.monotonic() + seconds

    def one_input(data: bytes) -> None:
        if time.monotonic() > t_end:
            print(json.dumps({"counts": counts}), flush=True)
            os._exit(0)
        if len(data) < 2:
            return
        target = TARGETS[data[0] % len(TARGETS)]
        name, base = seeds[target][data[1] % len(seeds[target])]
        buf, _ = mutate(base, random.Random(data[2:]))
        outcome = oracle.check(target, buf)
        counts[outcome] += 1
        if outcome in ("wrong", "other_error"):
            raise AssertionError(f"{outcome} on {target} ({name})")

    atheris.Setup([sys.argv[0], f"-seed={seed + 1}"], one_input)
    atheris.Fuzz()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", choices=TARGETS, action="append")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=150)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=150)
    ap.add_argument("--only", type=int, help="replay one mutation of --target/--batch and print it")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--atheris", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    if args.child or args.only is not None:
        targets = args.target or list(TARGETS)
        if args.only is not None:
            if len(targets) != 1:
                ap.error("--only replays one mutation of one --target")
            rng = _rng(args.seed, targets[0], args.batch, args.only)
            seeds = _seeds()[targets[0]]
            name, base = seeds[rng.randrange(len(seeds))]
            print(f"{targets[0]} #{args.only}: seed buffer {name}, edits {mutate(base, rng)[1]}", file=sys.stderr)
        run_batch(targets, args.seed, args.batch, args.start, args.count, args.only)
        return 0
    if args.atheris:
        run_atheris(args.seconds, args.seed)
        return 0
    res = fuzz(args.seconds, args.seed, tuple(args.target or TARGETS), args.batch_size)
    if args.json:
        print(json.dumps(res))
    else:
        c = res["counts"]
        print(f"{res['tried']} mutations in {res['seconds']} s (seed {res['seed']}): {c['raised']} raised, "
              f"{c['correct'] + c['correct_large']} accepted and correct ({c['correct_large']} large, checked "
              f"through unpack only), {c['crash']} crashes, {c['wrong']} wrong, {c['other_error']} other errors")  # fmt: skip
        for f in res["findings"]:
            print(f"  finding: {f}")
    bad = res["counts"]["crash"] + res["counts"]["wrong"] + res["counts"]["other_error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
