"""Data-parallel calibration of SmolLM2: the same recipe on 1 process and under torchrun on N processes
(gloo, CPU), with the wall time of each, the fraction of integer codes that differ between the two
exports, and the perplexity of both (first `--windows` windows of 2048 tokens of wiki.test.raw). As the
baseline of what float rounding alone does, one process once more with its initial LET scales nudged by
a relative 1e-7 (`nudged_quantize.py`; ABQ recipes): its codes and perplexity against the plain run.

A benchmark script, not a test: it measures and writes numbers.

    python benchmarks/distributed.py --data-dir ../shared/data [--processes 2] [--set key=value ...]

On one machine the N processes share its cores: 1 process runs with every core's torch threads, each of
N processes with cores/N threads, so the times compare the two ways of using the same machine. Writes
benchmarks/results/distributed-smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# float32 steps, as in the README; the block loop alone (finetune runs in one process: refused under torchrun)
SMALL_BUDGET = ["calibration.nsamples=4", "calibration.batch_size=2", "calibration.epochs=1",
                "calibration.autocast=none", "finetune.enabled=false", "output.formats=[abq-packed]"]


def quantize(recipe: str, sets: list[str], data_dir: str, out: Path, processes: int, nudged: bool = False) -> float:
    """Wall seconds of `abq quantize` on `processes` processes (`nudged`: through nudged_quantize.py)."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes))}
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    program = [str(Path(__file__).with_name("nudged_quantize.py"))] if nudged else ["-m", "abqcli"]
    cmd = [*launch, *program, "quantize", recipe, "--data-dir", data_dir, "--output", str(out),
           *(a for s in sets for a in ("--set", s))]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"abq quantize on {processes} process(es) failed: {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - start


def code_difference(a: Path, b: Path) -> tuple[int, int]:
    """(codes that differ, codes) between two abq-packed exports of the same model."""
    from abqcli.btc.format import packed_weight_from_tensors
    from abqcli.formats.abq_packed import PACKED_WEIGHTS, read_packed_export
    from abqcli.models.loading import load_tensors

    codes = []
    for directory in (a, b):
        export = read_packed_export(directory)
        tensors = load_tensors(export.directory / PACKED_WEIGHTS)
        codes.append({n: packed_weight_from_tensors(n, tensors, m, export.version).codes()
                      for n, m in export.modules.items()})
    differ = sum(int((codes[0][n] != codes[1][n]).sum()) for n in codes[0])
    return differ, sum(c.numel() for c in codes[0].values())


def perplexity(export: Path, data_dir: str, windows: int) -> float:
    from abqcli.evaluate import EvalRequest, run_eval

    return run_eval(EvalRequest(str(export), "wikitext2", data_dir, 2048, windows, "cpu", "float32")).ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "smollm2-w4a16-g128.yaml"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help=f"recipe overrides, applied after the small budget {' '.join(SMALL_BUDGET)}")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed-smollm2.json"))
    args = parser.parse_args()

    sets = SMALL_BUDGET + args.sets  # later overrides win; batch_size 2 splits over 2 processes
    with tempfile.TemporaryDirectory() as tmp:
        outs = {n: Path(tmp) / f"p{n}" for n in (1, args.processes)}
        seconds = {n: quantize(args.recipe, sets, args.data_dir, out, n) for n, out in outs.items()}
        exports = {n: out / "abq-packed" for n, out in outs.items()}
        differ, total = code_difference(exports[1], exports[args.processes])
        ppl = {n: perplexity(e, args.data_dir, args.windows) for n, e in exports.items()}
        nudged = None
        if "calibration.method=gptq" not in sets and "calibration.method=rtn" not in sets:
            quantize(args.recipe, sets, args.data_dir, Path(tmp) / "nudged", 1, nudged=True)
            nudged_differ, _ = code_difference(exports[1], Path(tmp) / "nudged" / "abq-packed")
            nudged_ppl = perplexity(Path(tmp) / "nudged" / "abq-packed", args.data_dir, args.windows)
            nudged = {"fraction_differing": nudged_differ / total, "ppl": nudged_ppl,
                      "ppl_rel_diff": abs(nudged_ppl / ppl[1] - 1)}
    result = {
        "recipe": os.path.relpath(args.recipe, ROOT), "overrides": sets, "cpu_count": os.cpu_count(),
        "wall_seconds": {str(n): round(s, 1) for n, s in seconds.items()},
        "speedup": round(seconds[1] / seconds[args.processes], 3),
        "codes_differing": differ, "codes": total, "fraction_differing": differ / total,
        "eval_windows": args.windows, "ppl": {str(n): p for n, p in ppl.items()},
        "ppl_rel_diff": abs(ppl[args.processes] / ppl[1] - 1),
        "one_process_nudged_1e-7": nudged,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
