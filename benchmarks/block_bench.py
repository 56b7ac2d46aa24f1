"""One SmolLM2 block calibrated per variant: seconds per step, seconds for the block, and the folded
block's output error.

A benchmark script, not a test: it measures and writes numbers.

    python benchmarks/block_bench.py                                      # W4A16 g128 recipe, block 15
    python benchmarks/block_bench.py --recipe configs/smollm2-w3a16-g128.yaml --block 5

Every variant calibrates the same block (`--block`) of the same recipe (`--recipe`, its budget) on the
same windows, in this one process, so the ratios between variants are measured in one run: the whole
prepare / train / fold of the method, the seconds per optimizer step (the first step, with the teacher
passes, left out), and the relative output error ‖Y_q − Y_1‖² / ‖Y_1‖² of the folded block on its
calibration windows. The block's input is the FP model's (what the loop gives block `--block` when
every block before it is float). Writes benchmarks/results/block_bench-<recipe>-b<block>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> recipe overrides on top of --recipe
    "rtn": ["calibration.method=rtn", "calibration.rounding=nearest"],
    "gptq": ["calibration.method=gptq", "calibration.rounding=gptq"],
    "abq+nearest": ["calibration.method=abq", "calibration.rounding=nearest"],
    "abq+gptq": ["calibration.method=abq", "calibration.rounding=gptq"],
    "abq+gptq 1 epoch": ["calibration.method=abq", "calibration.rounding=gptq", "calibration.epochs=1"],
    "gptq sequential": ["calibration.method=gptq", "calibration.rounding=gptq", "calibration.gptq.sequential=true"],
    "abq+gptq sequential": ["calibration.method=abq", "calibration.rounding=gptq", "calibration.gptq.sequential=true"],
    "abq+gptq no attention KL": ["calibration.method=abq", "calibration.rounding=gptq",
                                  "calibration.loss.attention_kl=false"],
    "abq+gptq 4 windows per step": ["calibration.method=abq", "calibration.rounding=gptq",
                                     "calibration.batch_size=4"],
    "abq+learned (lr 5e-3)": ["calibration.method=abq", "calibration.rounding=learned"],
    "abq+learned (lr 2e-2)": ["calibration.method=abq", "calibration.rounding=learned",
                              "calibration.learned.lr=2e-2"],
}


def block_context(recipe, data_dir: str | None, block_index: int):
    """A BlockContext for block `block_index` of the recipe's model on its calibration windows."""
    from abqcli.evaluate import check_seqlen
    from abqcli.models.adapters import adapter_for
    from abqcli.models.loading import load_model
    from abqcli.pipeline import calibration_windows
    from abqcli.quant.calibrate import Calibrator
    from abqcli.quant.fakequant import set_kv_quant

    cal = recipe.calibration
    model, tokenizer, _ = load_model(recipe.model.path, recipe.model.dtype, "cpu",
                                     lambda cfg: check_seqlen(cal.seqlen, cfg))
    adapter = adapter_for(model)
    windows = calibration_windows(recipe, tokenizer, data_dir).windows
    set_kv_quant(model, adapter, 16)
    calibrator = Calibrator(model, adapter, recipe, windows, Path("/nonexistent"), torch.device("cpu"))
    hidden, block_kwargs = adapter.capture_block_inputs(model, windows)
    blocks = adapter.blocks(model)
    with torch.no_grad():
        for block, kwargs in zip(blocks[:block_index], block_kwargs):
            hidden = torch.cat([block(hidden[i:i + 1], **kwargs) for i in range(len(hidden))])
    return calibrator, blocks[block_index], hidden, block_kwargs[block_index]


def calibrate_block(recipe, base, block_index: int) -> dict:
    """prepare / train / fold of `recipe`'s method on a fresh copy of the block in `base`: timings and the
    folded block's relative output error against the FP block's output."""
    from abqcli.registry import METHODS

    calibrator, block, hidden, kwargs = base
    calibrator.recipe = recipe  # the context takes its layer settings and batch size from it
    ctx = calibrator._context(block_index, copy.deepcopy(block), hidden, hidden, kwargs)
    method = METHODS.load(recipe.calibration.method)(recipe, calibrator.adapter)
    for p in ctx.qblock.parameters():
        p.requires_grad_(False)
    step_times: list[float] = []
    last = [0.0]

    def on_step(epoch: int, step: int, loss: float) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    start = time.perf_counter()
    method.prepare(ctx)
    last[0] = time.perf_counter()
    training = method.train(ctx, on_step)
    method.fold(ctx)
    seconds = time.perf_counter() - start
    y_q = ctx.run(ctx.qblock, ctx.q_in)
    error = float(((y_q - ctx.fp_out) ** 2).sum() / (ctx.fp_out ** 2).sum())
    timed = step_times[1:]
    return {"block_seconds": round(seconds, 2), "steps": len(step_times),
            "seconds_per_step": round(sum(timed) / len(timed), 4) if timed else None,
            "windows_per_step": recipe.calibration.batch_size, "loss_last": training.loss_last,
            "relative_output_error": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/smollm2-w4a16-g128.yaml")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of VARIANTS")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="more recipe overrides")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    from abqcli.recipe import load_recipe

    base = block_context(load_recipe(args.recipe, args.sets), args.data_dir, args.block)
    rows = {}
    for name in args.variants.split(","):
        rows[name] = calibrate_block(load_recipe(args.recipe, [*args.sets, *VARIANTS[name]]), base, args.block)
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    result = {"recipe": args.recipe, "block": args.block, "sets": args.sets, "threads": torch.get_num_threads(),
              "variants": rows}
    path = Path(args.out) / f"block_bench-{Path(args.recipe).stem}-b{args.block}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
