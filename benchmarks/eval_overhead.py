"""Overhead of abq's perplexity loop over a bare transformers loop on the same model and windows.

Loads the model once (abqcli.models.loading.load_model), builds the evaluation windows once
(abqcli.data), then times

  (a) a bare loop: `model(window).logits` and `F.cross_entropy`, summed NLL -> exp(mean);
  (b) `abqcli.evaluate.perplexity` on the same model and windows;

alternating which goes first, `--repeats` times, and keeps the fastest run of each (wall clock, and
process CPU time, which is less disturbed by other jobs on a shared machine). Both perplexities must
agree (same model, same windows, same arithmetic). Writes JSON and prints a markdown row.

    python benchmarks/eval_overhead.py --model smollm2-135m --data-dir ../shared/data \\
        --seqlen 2048 --limit 4 --out benchmarks/results/eval_overhead.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from abqcli import data
from abqcli.evaluate import perplexity, resolve_device
from abqcli.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"
PPL_RTOL = 1e-6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="anything `abq eval --model` accepts")
    p.add_argument("--dataset", default="wikitext2", help="dataset name or text file")
    p.add_argument("--data-dir", default=os.environ.get("ABQ_DATA_DIR") or str(DEFAULT_DATA_DIR),
                   help="folder holding named datasets (default: $ABQ_DATA_DIR or ../shared/data)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--limit", type=int, default=4, help="number of windows")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each loop (order alternates)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_overhead.json"))
    return p.parse_args(argv)


@torch.no_grad()
def bare_perplexity(model, segments: torch.Tensor, device: str) -> tuple[float, int]:
    """The plain transformers loop: exp(mean next-token cross-entropy) over the windows."""
    nll_sum, count = 0.0, 0
    for window in segments:
        ids = window.unsqueeze(0).to(device)
        logits = model(ids).logits
        nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        nll_sum += nll.item()
        count += ids.shape[1] - 1
    return math.exp(nll_sum / count), count


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    t0 = time.perf_counter()
    model, tokenizer, source = load_model(args.model, args.dtype, device)
    load_s = time.perf_counter() - t0
    text = data.load_text(args.dataset, "test", args.data_dir)
    ids, has_bos = data.tokenize(tokenizer, text.text)
    segments = data.eval_segments(ids, args.seqlen, args.limit)
    n = segments.shape[0]
    print(f"model {source.describe()} loaded in {load_s:.1f}s; {n} windows of {args.seqlen} tokens "
          f"from {text.origin}", file=sys.stderr)

    with torch.no_grad():  # warm-up, untimed: first-call allocations and kernel selection
        model(segments[:1, : min(args.seqlen, 64)].to(device))

    def run_bare():
        return bare_perplexity(model, segments, device)

    def run_abq():
        ppl, tokens, _ = perplexity(model, segments, device)
        return ppl, tokens

    runs = {"bare": run_bare, "abq": run_abq}
    times: dict[str, list[float]] = {"bare": [], "abq": []}
    cpu_times: dict[str, list[float]] = {"bare": [], "abq": []}
    ppls: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for r in range(args.repeats):
        order = ("bare", "abq") if r % 2 == 0 else ("abq", "bare")
        for name in order:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            ppl, count = runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            ppls[name], tokens[name] = ppl, count
            print(f"run {r + 1}/{args.repeats} {name:4s}: {times[name][-1]:.3f}s wall, "
                  f"{cpu_times[name][-1]:.3f}s cpu, ppl {ppl:.6f}", file=sys.stderr)

    bare_s, abq_s = min(times["bare"]), min(times["abq"])
    ratio = abq_s / bare_s
    cpu_ratio = min(cpu_times["abq"]) / min(cpu_times["bare"])
    ppl_rel_diff = abs(ppls["abq"] - ppls["bare"]) / ppls["bare"]
    match = ppl_rel_diff <= PPL_RTOL and tokens["abq"] == tokens["bare"]
    row = (f"| {args.model} | {args.seqlen} | {n} | {bare_s:.3f} | {abq_s:.3f} | {ratio:.3f} | "
           f"{cpu_ratio:.3f} | {ppls['bare']:.4f} | {ppls['abq']:.4f} |")
    header = ("| model | seqlen | windows | bare s | abq s | abq/bare (wall) | abq/bare (cpu) | ppl bare | "
              "ppl abq |\n|---|---|---|---|---|---|---|---|---|")
    result = {
        "benchmark": "eval_overhead",
        "model": args.model,
        "model_source": source.describe(),
        "dataset": args.dataset,
        "data_file": text.origin,
        "data_sha256": text.sha256,
        "seqlen": args.seqlen,
        "windows": n,
        "tokens_scored": tokens["abq"],
        "bos": has_bos,
        "device": device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "bare_seconds": bare_s,
        "abq_seconds": abq_s,
        "bare_seconds_all": times["bare"],
        "abq_seconds_all": times["abq"],
        "bare_cpu_seconds_all": cpu_times["bare"],
        "abq_cpu_seconds_all": cpu_times["abq"],
        "ratio_abq_over_bare": ratio,
        "cpu_ratio_abq_over_bare": cpu_ratio,
        "ppl_bare": ppls["bare"],
        "ppl_abq": ppls["abq"],
        "ppl_rel_diff": ppl_rel_diff,
        "ppl_match": match,
        "load_seconds": load_s,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "markdown": header + "\n" + row,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(header)
    print(row)
    print(f"wrote {out}", file=sys.stderr)
    if not match:
        print(f"error: perplexities differ: bare {ppls['bare']!r} vs abq {ppls['abq']!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
