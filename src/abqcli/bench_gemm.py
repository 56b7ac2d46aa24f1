"""GEMM benchmark on a GPU (DESIGN §6, §8): the BTC bit-plane GEMM against torch fp16 matmul (cuBLAS) and
`torch._int_mm` (int8) on LLaMA-7B shapes.

For every N x K in {4096x4096, 11008x4096, 4096x11008} and M in {1, 8, 16, 64, 256}:

* `fp16`: `x @ w.T`, x [M, K], w [N, K] in fp16 (cuBLAS);
* `int8`: `torch._int_mm(x, w.T)` in int8 -> int32. It needs M > 16, so smaller M runs padded to 32 rows
  (marked `padded_m` in the JSON, `*` in the table) and is charged with the padded call's time;
* `btc W{w}A{a} gemm`: the binary tensor-core GEMM alone on packed planes (int32 accumulators), the
  kernel `abq` would run, for (w, a) in {(4, 4), (2, 8), (2*, 8), (8, 8)} with per-channel weights;
* `btc W{w}A{a} linear`: the whole packed layer (activation quantize + pack kernel, GEMM with the fused
  affine epilogue) from fp16 input to fp16 output.

Timing: CUDA events around each call on torch's current stream, after warm-up; a `torch.cuda._sleep`
spin is queued before each timed call so that host-side launch overhead does not show up as GPU time;
the median of `iters` calls is reported. Effective TOPS = 2·M·N·K / time (the equivalent dense GEMM's
operations, whatever the precision). Results go to `<out>/gpu-gemm-<timestamp>.json` and `.md`.

The kernels are the `cupy` GEMM backend's (`abqcli.btc.backends`), timed through its `int_gemm_planes`
and `linear`; the tile column is its launch geometry (`abqcli.btc.cuda.launch_geometry`).

Run: `abq bench gemm` (`run_gemm_bench`), or `python -m abqcli.bench_gemm [--out DIR] [--iters N]
[--warmup N] [--quick]` where abq is not installed; the out directory defaults to $OUT when set, else
benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from abqcli.btc import cuda as bc
from abqcli.btc.backends import GemmBackend
from abqcli.btc.format import PackedWeight, num_planes, padded_k
from abqcli.errors import AbqError
from abqcli.quant.quantizer import qmax_for

SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N, K)
M_SIZES: tuple[int, ...] = (1, 8, 16, 64, 256)
QUICK_M_SIZES: tuple[int, ...] = (1, 16, 256)  # --quick: the first shape only, at most QUICK_ITERS calls
QUICK_ITERS = 20
BACKEND = "cupy"  # the GEMM backend whose kernels are timed
BTC_PAIRS: tuple[tuple[str, int, bool, int], ...] = (  # (label, w_bits, balance, a_bits)
    ("W4A4", 4, False, 4),
    ("W2A8", 2, False, 8),
    ("W2*A8", 2, True, 8),
    ("W8A8", 8, False, 8),
)
INT_MM_MIN_M = 17
INT_MM_PAD_M = 32
SLEEP_CYCLES = 1_000_000  # ~0.5 ms spin before each timed call


def _time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median GPU time of one call, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    sleep = getattr(torch.cuda, "_sleep", None)
    events = []
    for _ in range(iters):
        if sleep is not None:
            sleep(SLEEP_CYCLES)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _random_weight(n: int, k: int, w_bits: int, balance: bool, device: torch.device) -> PackedWeight:
    """A PackedWeight with random planes and plausible scales (timing does not depend on the values)."""
    qmax = qmax_for(w_bits, balance)
    planes = torch.randint(
        -(2**31), 2**31 - 1, (num_planes(qmax), n, padded_k(k) // 32), dtype=torch.int32, device=device
    )
    return PackedWeight(
        planes=planes,
        scale=torch.rand(n, 1, device=device) * 1e-2 + 1e-3,
        zero=torch.randint(0, qmax + 1, (n, 1), device=device).float(),
        code_sums=torch.randint(0, k * qmax // 2 + 1, (n, 1), device=device, dtype=torch.int32),
        in_features=k,
        out_features=n,
        bits=w_bits,
        balance=balance,
        group_size=None,
    )


def _row(n: int, k: int, m: int, kind: str, ms: float | None, note: str = "", **extra) -> dict:
    tops = None if ms is None else 2.0 * m * n * k / (ms * 1e-3) / 1e12
    return {"N": n, "K": k, "M": m, "kind": kind, "ms": ms, "tops": tops, "note": note, **extra}


def run_gemm_bench(
    out_dir: Path, quick: bool = False, warmup: int = 10, iters: int = 50, log: Callable[[str], None] = print
) -> dict:
    """Time every (shape, M, kind) — with `quick`, the first shape at M in QUICK_M_SIZES and at most
    QUICK_ITERS calls; write gpu-gemm-<timestamp>.json and .md under out_dir; return the JSON document
    (with "files"). Raises InputError without CuPy or an sm_80+ GPU."""
    from abqcli.runtime import require_backend

    gemm = require_backend(BACKEND)
    shapes, m_sizes = (SHAPES[:1], QUICK_M_SIZES) if quick else (SHAPES, M_SIZES)
    iters = min(iters, QUICK_ITERS) if quick else iters
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    rows: list[dict] = []
    for n, k in shapes:
        rows += _time_shape(gemm, n, k, m_sizes, warmup, iters, device, log)
    return _write(_document(rows, device, warmup, iters), Path(out_dir))


def _time_shape(gemm: GemmBackend, n: int, k: int, m_sizes: tuple[int, ...], warmup: int, iters: int,
                device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Rows of one N x K: fp16, int8 and every BTC pair (GEMM alone, whole layer) at each M."""
    w16 = torch.randn(n, k, device=device, dtype=torch.float16)
    w8 = torch.randint(-128, 128, (n, k), device=device, dtype=torch.int8)
    weights = {label: _random_weight(n, k, wb, bal, device) for label, wb, bal, _ in BTC_PAIRS}
    kw = padded_k(k) // 32
    rows: list[dict] = []
    for m in m_sizes:
        x16 = torch.randn(m, k, device=device, dtype=torch.float16)
        last = [_row(n, k, m, "fp16", _time_ms(lambda x=x16, w=w16: x @ w.T, warmup, iters))]
        try:
            m8 = m if m >= INT_MM_MIN_M else INT_MM_PAD_M
            x8 = torch.randint(-128, 128, (m8, k), device=device, dtype=torch.int8)
            ms = _time_ms(lambda x=x8, w=w8: torch._int_mm(x, w.T), warmup, iters)
            last.append(_row(n, k, m, "int8", ms, note="padded" if m8 != m else "", padded_m=m8))
        except Exception as exc:  # noqa: BLE001  (report, do not abort the run)
            last.append(_row(n, k, m, "int8", None, note=f"n/a: {type(exc).__name__}: {exc}".splitlines()[0]))
        for label, _, _, a_bits in BTC_PAIRS:
            w = weights[label]
            pa = num_planes(qmax_for(a_bits))
            a_planes = torch.randint(-(2**31), 2**31 - 1, (pa, m, kw), dtype=torch.int32, device=device)
            geo = bc.launch_geometry(pa, m, w.planes.shape[0], n, kw, kw, 1, float_out=False)
            ms = _time_ms(lambda a=a_planes, p=w.planes: gemm.int_gemm_planes(a, p, None), warmup, iters)
            last.append(_row(n, k, m, f"btc {label} gemm", ms, tile=f"m{geo.mt}n{geo.nt}"))
            ms = _time_ms(lambda x=x16, pw=w, ab=a_bits: gemm.linear(x, pw, ab, None), warmup, iters)
            last.append(_row(n, k, m, f"btc {label} linear", ms))
        log(f"N={n} K={k} M={m}: " + ", ".join(
            f"{r['kind']} {r['ms']:.4f} ms" if r["ms"] is not None else f"{r['kind']} n/a" for r in last))
        rows += last
    return rows


def _document(rows: list[dict], device: torch.device, warmup: int, iters: int) -> dict:
    import cupy

    props = torch.cuda.get_device_properties(device)
    return {
        "benchmark": "gpu-gemm",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": props.name,
        "compute_capability": f"sm_{props.major}{props.minor}",
        "torch": torch.__version__,
        "cupy": cupy.__version__,
        "cuda_runtime": torch.version.cuda,
        "method": {
            "timing": "CUDA events per call after warm-up, torch.cuda._sleep spin before each call, median",
            "warmup": warmup,
            "iters": iters,
            "tops": "2*M*N*K / time",
            "int8_small_m": f"torch._int_mm needs M > 16: M < {INT_MM_MIN_M} runs padded to {INT_MM_PAD_M} rows",
            "btc_weights": "per-channel, random planes",
        },
        "results": rows,
    }


def _write(doc: dict, out_dir: Path) -> dict:
    """gpu-gemm-<timestamp>.json and .md under out_dir; the paths go into doc["files"]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"gpu-gemm-{stamp}.json"
    md_path = out_dir / f"gpu-gemm-{stamp}.md"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    md_path.write_text(markdown_table(doc))
    doc["files"] = {"json": str(json_path), "markdown": str(md_path)}
    return doc


def markdown_table(doc: dict) -> str:
    """One row per (N, K, M); per kind: time in µs and effective TOPS; BTC columns add x vs fp16."""
    rows = doc["results"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    by_key: dict[tuple[int, int, int], dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["N"], r["K"], r["M"]), {})[r["kind"]] = r
    lines = [
        f"# GPU GEMM benchmark — {doc['device']} ({doc['compute_capability']}), {doc['timestamp']}",
        "",
        (
            f"torch {doc['torch']}, CuPy {doc['cupy']}. Median of {doc['method']['iters']} calls after "
            f"{doc['method']['warmup']} warm-up calls, CUDA events. Cells: µs per call / effective TOPS "
            "(2·M·N·K / time); for BTC also the speed-up over fp16. `*` int8 padded to 32 rows "
            "(torch._int_mm needs M > 16). `gemm` = integer bit-plane GEMM on packed planes; `linear` = "
            "quantize+pack + GEMM with fused epilogue, fp16 in/out."
        ),
        "",
        "| N×K | M | " + " | ".join(kinds) + " |",
        "|---|---:|" + "---:|" * len(kinds),
    ]
    for (n, k, m), cells in by_key.items():
        fp16 = cells.get("fp16", {}).get("ms")
        out = []
        for kind in kinds:
            r = cells.get(kind)
            if r is None or r["ms"] is None:
                out.append("n/a")
                continue
            cell = f"{r['ms'] * 1e3:.1f} / {r['tops']:.2f}"
            if r.get("note") == "padded":
                cell += "*"
            if kind.startswith("btc") and fp16:
                cell += f" ({fp16 / r['ms']:.2f}x)"
            out.append(cell)
        lines.append(f"| {n}×{k} | {m} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abqcli.bench_gemm", description=__doc__.splitlines()[0])
    default_out = os.environ.get("OUT") or "benchmarks/results"
    parser.add_argument(
        "--out", type=Path, default=Path(default_out), help=f"output directory ({default_out})"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="one shape, M in {1, 16, 256}, fewer iterations")
    args = parser.parse_args(argv)
    try:
        doc = run_gemm_bench(args.out, args.quick, args.warmup, args.iters)
    except AbqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(summary(doc))
    return 0


def summary(doc: dict) -> str:
    """The markdown table and where the files went."""
    return f"{markdown_table(doc)}\nwrote {doc['files']['json']} and {doc['files']['markdown']}"


if __name__ == "__main__":
    sys.exit(main())
