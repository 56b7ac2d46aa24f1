"""Where the seconds of one ABQ block go on this CPU: the phases of a block and the cost of one
optimizer step in float32 and under bfloat16 autocast.

A benchmark script, not a test: it measures and writes numbers.

    python benchmarks/step_profile.py                                     # W4A4 recipe, block 15
    python benchmarks/step_profile.py --recipe configs/smollm2-w4a16-g128.yaml

The block is calibrated as the loop does it (`block_bench.block_context`: the FP model's input to
`--block`), with the recipe's rotation turned off (block_bench builds an unrotated model). Phases are
timed by wrapping the library functions that do them: the teacher passes (`run_block`), the
pass that records LET's activation statistics and the attention maps of the KL term
(`_observe_teacher`), the GPTQ Hessians and rounding, and the training steps. The block is calibrated twice, in float32 and with
`calibration.autocast: bfloat16` (the student's forward under `torch.autocast("cpu", torch.bfloat16)`,
the backward following it), and a third time with `calibration.autocast_passes: true` as well (the
chain passes under the same autocast); for each, `--steps` more optimizer steps are timed on a fresh copy, the
float32 step is split by operator with torch.profiler, and the machine's rate on one of the block's
matmuls is measured in both dtypes. Writes benchmarks/results/step_profile-<recipe>.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

TIMED = {  # module (or module:class) -> functions whose wall time is a phase of the block
    "abqcli.quant.methods": ("run_block", "collect_hessians", "gptq_quantize"),
    "abqcli.quant.methods.abq:AbqMethod": ("_observe_teacher",),
}


def _timed(function, name: str, phases: dict[str, float]):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

    return timed


def time_phases(phases: dict[str, float]) -> None:
    """Wrap the TIMED functions so that their wall time adds up in `phases`."""
    import importlib

    for owner_name, names in TIMED.items():
        module_name, _, class_name = owner_name.partition(":")
        owner = importlib.import_module(module_name)
        owner = getattr(owner, class_name) if class_name else owner
        for name in names:
            setattr(owner, name, _timed(getattr(owner, name), name, phases))


def fresh_block(recipe, base, block_index: int):
    """(method, ctx) of a fresh copy of the block, as the loop sets it up before `prepare`."""
    from abqcli.recipe_checks import bf16_passes
    from abqcli.registry import METHODS

    calibrator, block, hidden, kwargs = base
    calibrator.bf16_passes = bf16_passes(recipe, str(calibrator.device))  # as the variant's loop would
    ctx = calibrator._context(block_index, copy.deepcopy(block), hidden, hidden, kwargs)
    method = METHODS.load(recipe.calibration.method)(recipe, calibrator.adapter)
    for p in ctx.qblock.parameters():
        p.requires_grad_(False)
    return method, ctx


def calibrate_block(recipe, base, block_index: int, phases: dict[str, float]) -> float:
    """prepare / train / fold of the block, each timed into `phases`; returns the seconds per step."""
    start = time.perf_counter()
    method, ctx = fresh_block(recipe, base, block_index)
    phases["context (copy, FP teacher pass)"] = time.perf_counter() - start
    marks: list[float] = []
    for phase, call in (("prepare", lambda: method.prepare(ctx)),
                        ("train", lambda: method.train(ctx, lambda *_: marks.append(time.perf_counter()))),
                        ("fold", lambda: method.fold(ctx))):
        t = time.perf_counter()
        call()
        phases[phase] = time.perf_counter() - t
    phases["block total"] = time.perf_counter() - start
    phases["training steps (after the first)"] = marks[-1] - marks[0]
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def step_seconds(recipe, base, block_index: int, steps: int, profile: bool = False):
    """Seconds per optimizer step on a freshly prepared block (and a profiler table when asked)."""
    method, ctx = fresh_block(recipe, base, block_index)
    method.prepare(ctx)
    optimizer = torch.optim.AdamW([g for g in method.param_groups() if g["params"]], weight_decay=0.0)
    fp_on_q = method.fp_on_quantized_chain(ctx)
    probs = method.teacher_probs
    batches = ctx.batches()

    def step(i: int) -> None:
        b = i % len(batches)
        optimizer.zero_grad(set_to_none=True)
        method._backward(ctx, batches[b], fp_on_q, probs[b] if probs else None)
        optimizer.step()

    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    seconds = (time.perf_counter() - start) / steps
    if not profile:
        return seconds, None
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3):
            step(i)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    return seconds, {e.key: round(e.self_cpu_time_total / total, 4) for e in ops[:12]}


def teacher_pass_seconds(recipe, base, block_index: int) -> dict[str, float]:
    """LET's statistics and the KL term's P_1 in one pass of the FP block (`_observe_teacher`, what the
    method does) against the two passes it replaces (`collect_activation_stats`, then `record_probs` per
    batch), on the same freshly set-up block."""
    from abqcli.quant.methods.abq import record_probs
    from abqcli.quant.transforms import collect_activation_stats

    method, ctx = fresh_block(recipe, base, block_index)
    batches = [ctx.batch(ctx.fp_in, b) for b in ctx.batches()]
    start = time.perf_counter()
    collect_activation_stats(ctx.fp_block, method.adapter, [((x,), ctx.kwargs) for x in batches])
    for x in batches:
        record_probs(ctx.fp_block, method.adapter, x, ctx.kwargs)
    separate = time.perf_counter() - start
    start = time.perf_counter()
    method._observe_teacher(ctx)
    return {"statistics pass + P_1 pass": round(separate, 3), "one pass": round(time.perf_counter() - start, 3)}


def cpu_description() -> dict:
    """The CPU the numbers come from: bf16 autocast pays only where it multiplies in bf16 natively."""
    from abqcli.recipe_checks import has_native_bfloat16

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return {"model": names[0] if names else "unknown", "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bfloat16": has_native_bfloat16("cpu")}


def matmul_gflops(dtype: torch.dtype, m: int = 512, k: int = 576, n: int = 1536, reps: int = 50) -> float:
    """This CPU's rate on one of the block's matmuls (tokens x hidden times hidden x intermediate)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    for _ in range(3):
        a @ b.T
    start = time.perf_counter()
    for _ in range(reps):
        a @ b.T
    return round(2 * m * k * n * reps / (time.perf_counter() - start) / 1e9, 1)


def profile_variant(recipe, base, args, phases: dict[str, float], profile: bool) -> dict:
    """The block's phases (`phases`: filled by the `time_phases` wrappers), its seconds per step in the
    loop, and `--steps` more steps on a fresh copy."""
    phases.clear()
    per_step = calibrate_block(recipe, base, args.block, phases)
    block_phases = dict(phases)  # the block's own; the step timings below prepare another block
    seconds, ops = step_seconds(recipe, base, args.block, args.steps, profile=profile)
    result = {"phases_seconds": {k: round(v, 3) for k, v in block_phases.items()},
              "seconds_per_step_in_block": round(per_step, 4), "seconds_per_step": round(seconds, 4)}
    if ops:
        result["step_self_cpu_share"] = ops
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/smollm2-w4a4.yaml")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--float32-only", action="store_true",
                        help="skip the bf16 variant (slow on a CPU without native bf16: see cpu in the JSON)")
    args = parser.parse_args(argv)
    from block_bench import block_context

    from abqcli.recipe import load_recipe

    autocasts = (("float32", "none", "false"),) + (() if args.float32_only else (
        ("bfloat16 autocast", "bfloat16", "false"), ("bfloat16 autocast, passes too", "bfloat16", "true")))
    variants = {name: load_recipe(args.recipe, ["calibration.rotation=none", f"calibration.autocast={autocast}",
                                                f"calibration.autocast_passes={passes}"])
                for name, autocast, passes in autocasts}
    base = block_context(variants["float32"], args.data_dir, args.block)
    result = {"recipe": args.recipe, "block": args.block, "threads": torch.get_num_threads(),
              "cpu": cpu_description(),
              "teacher_pass_seconds": teacher_pass_seconds(variants["float32"], base, args.block)}
    phases: dict[str, float] = {}
    time_phases(phases)
    for name, variant in variants.items():
        result[name] = profile_variant(variant, base, args, phases, profile=name == "float32")
    if not args.float32_only:
        result["bf16_speedup"] = {
            "block": round(result["float32"]["phases_seconds"]["block total"]
                           / result["bfloat16 autocast"]["phases_seconds"]["block total"], 3),
            "step": round(result["float32"]["seconds_per_step"] / result["bfloat16 autocast"]["seconds_per_step"], 3),
            "block, passes too": round(result["float32"]["phases_seconds"]["block total"]
                                       / result["bfloat16 autocast, passes too"]["phases_seconds"]["block total"], 3)}
    result["matmul_gflops"] = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    cpu = "" if result["cpu"]["native_bfloat16"] else "-no-native-bf16"
    path = Path(args.out) / f"step_profile-{Path(args.recipe).stem}{cpu}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
