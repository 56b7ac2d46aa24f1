"""Packed CPU evaluation against FP evaluation on the same windows (perplexity protocol of DESIGN §7).

Loads the model (default `smollm2-135m`), measures FP perplexity, makes a W4A4 RTN export (abq-packed,
in a temporary directory), loads it with `load_packed` (backend cpu) and measures its perplexity on the
same windows. Writes `benchmarks/results/packed_eval.json` with both times, their ratio (packed / FP)
and both perplexities (plus the in-memory fake-quant model's, for reference).

Timing: each model gets one untimed warm-up forward on 32 tokens, then the windows are timed with
`abqcli.evaluate.perplexity` (the code `abq eval` runs); with `--repeats N` the FP and packed runs
alternate N times and the best of each is kept. The packed model's load time (unpacking the planes
into the CPU path's operands) is reported separately. On a machine shared with other work, torch's
intra-op threads get descheduled and every small elementwise op waits for them; the packed path has
more such ops per layer (activation quantization), so `--threads 1` gives the steadier comparison.

    python benchmarks/packed_eval.py                        # quick: --limit 2 --seqlen 512
    python benchmarks/packed_eval.py --limit 4 --seqlen 2048   # the real run
    python benchmarks/packed_eval.py --threads 1 --repeats 3   # steadier on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]


def rtn_export(model, tokenizer, recipe, target: Path, source: str) -> None:
    """RTN fake-quantize `model` in place per `recipe` and write it as abq-packed into `target`."""
    from abqcli.formats import ExportInput
    from abqcli.formats.abq_packed import ABQ_PACKED
    from abqcli.models.adapters import adapter_for
    from abqcli.quant.fakequant import apply_rtn
    from abqcli.recipe import describe, dump_recipe

    wrapped, states = apply_rtn(model, adapter_for(model), recipe.layer_quant, recipe.kv_bits)
    layers = {name: q.quant for name, q in wrapped.items()}
    ABQ_PACKED.write(target, ExportInput(model, tokenizer, dump_recipe(recipe), recipe.kv_bits, layers, states,
                                         {"model": source, "method": "rtn", "scheme": describe(recipe)}))


def timed_ppl(model, segments) -> tuple[float, float]:
    from abqcli.evaluate import perplexity

    with torch.no_grad():
        model(segments[:1, :32])  # warm-up
    ppl, _, seconds = perplexity(model, segments)
    return ppl, seconds


def main(argv: list[str] | None = None) -> int:
    from abqcli import data
    from abqcli.formats.abq_packed import load_packed
    from abqcli.models.loading import load_model
    from abqcli.recipe import describe, load_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--scheme", default="w4a4", help="recipe preset for the RTN export")
    parser.add_argument("--limit", type=int, default=2, help="windows")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each model (best is kept)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "packed_eval.json"))
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.scheme, [f"model.path={args.model}"])
    text = data.load_text(args.dataset, "test", args.data_dir)
    t0 = time.perf_counter()
    model, tokenizer, source = load_model(args.model, "float32", "cpu")
    fp_load = time.perf_counter() - t0
    ids, _ = data.tokenize(tokenizer, text.text)
    segments = data.eval_segments(ids, args.seqlen, args.limit)
    print(f"{source.describe()}: {segments.shape[0]} windows x {args.seqlen} tokens, "
          f"{torch.get_num_threads()} threads", flush=True)

    with tempfile.TemporaryDirectory(prefix="abq-packed-eval-") as tmp:
        export = Path(tmp) / "packed"
        fq_model, _, _ = load_model(args.model, "float32", "cpu")
        rtn_export(fq_model, tokenizer, recipe, export, source.describe())
        fq_ppl, fq_seconds = timed_ppl(fq_model, segments)
        print(f"fq      ppl {fq_ppl:10.3f}  {fq_seconds:7.2f} s  (in-memory fake-quant, RTN)", flush=True)
        del fq_model
        t0 = time.perf_counter()
        packed, _, _ = load_packed(export)
        packed_load = time.perf_counter() - t0
        export_bytes = sum(p.stat().st_size for p in export.iterdir())

    fp_times, packed_times = [], []
    for r in range(args.repeats):  # alternate, so that load on a shared machine hits both alike
        fp_ppl, seconds = timed_ppl(model, segments)
        fp_times.append(seconds)
        print(f"fp      ppl {fp_ppl:10.3f}  {seconds:7.2f} s", flush=True)
        packed_ppl, seconds = timed_ppl(packed, segments)
        packed_times.append(seconds)
        print(f"packed  ppl {packed_ppl:10.3f}  {seconds:7.2f} s", flush=True)
    fp_seconds, packed_seconds = min(fp_times), min(packed_times)
    ratio = packed_seconds / fp_seconds
    print(f"ratio packed / fp = {ratio:.3f} (goal <= 1.5; best of {args.repeats})", flush=True)

    result = {
        "model": source.describe(),
        "scheme": describe(recipe),
        "method": "rtn",
        "dataset": args.dataset,
        "data_file": text.origin,
        "data_sha256": text.sha256,
        "seqlen": args.seqlen,
        "windows": int(segments.shape[0]),
        "fp": {"ppl": fp_ppl, "seconds": fp_seconds, "runs": fp_times, "load_seconds": fp_load},
        "packed": {"ppl": packed_ppl, "seconds": packed_seconds, "runs": packed_times,
                   "load_seconds": packed_load, "backend": "cpu", "export_bytes": export_bytes},
        "fakequant": {"ppl": fq_ppl, "seconds": fq_seconds},
        "ratio_packed_over_fp": ratio,
        "goal_ratio": 1.5,
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
