"""Perplexity of SmolLM2-135M: FP vs RTN vs ABQ per scheme, calibration time and peak RSS, and an ablation.

A benchmark script, not a test: it measures and writes numbers.

    python benchmarks/quality.py --data-dir ../shared/data                 # the full protocol
    python benchmarks/quality.py --schemes W4A4 --limit 4 --ablation none  # a quick look
    python benchmarks/quality.py --schemes W4A8 --ablation none --merge   # add a row to quality.json
    python benchmarks/quality.py --schemes W3A16g128 --rows gptq,abq+gptq --ablation none --merge

Rows per scheme (--rows): `recipe` (the recipe as written) and the variants of VARIANTS (the same recipe
with another method, rounding or rotation). RTN is evaluated for every scheme without a rotation
(`rtn_ppl`) and with the recipe's rotation (`rtn_rotated_ppl`; hadamard when the recipe has none), or
reused with --merge.

Each ABQ calibration runs `abq quantize` in a subprocess, started through `sh` (Linux keeps a process's
RSS high-water mark across fork + exec, so a direct child of this process, which holds the evaluated
models, would report this process's peak as its own; sh's fork starts it from sh's small one), from the
`configs/smollm2-*.yaml` recipes (calibration budget overridable with --nsamples/--seqlen/--epochs).
Perplexity follows DESIGN §7 on wiki.test.raw: first --limit windows of --eval-seqlen tokens.
Writes benchmarks/results/quality.json, quality.md and quality.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = {  # name -> recipe file
    "W4A16g128": "configs/smollm2-w4a16-g128.yaml",
    "W3A16g128": "configs/smollm2-w3a16-g128.yaml",
    "W2*A16g64": "configs/smollm2-w2star-a16-g64.yaml",
    "W4A8": "configs/smollm2-w4a8.yaml",
    "W6A6": "configs/smollm2-w6a6.yaml",
    "W4A4": "configs/smollm2-w4a4.yaml",
    "W2*A8": "configs/smollm2-w2star-a8.yaml",
    "W2*A8g128": "configs/smollm2-w2star-a8-g128.yaml",  # not in the list: per-channel W2* is hopeless here
    "W4A16": "configs/smollm2-w4a16.yaml",
    "W3A16": "configs/smollm2-w3a16.yaml",
}
VARIANTS = {  # row name -> recipe overrides: how the same recipe rounds its weights
    "gptq": ["calibration.method=gptq", "calibration.rounding=gptq"],  # GPTQ alone
    "abq+nearest": ["calibration.method=abq", "calibration.rounding=nearest"],
    "abq+gptq": ["calibration.method=abq", "calibration.rounding=gptq"],
    "abq+learned": ["calibration.method=abq", "calibration.rounding=learned"],
    "no rotation": ["calibration.rotation=none"],
    "hadamard": ["calibration.rotation=hadamard"],
    "random-orthogonal": ["calibration.rotation=random-orthogonal"],
    "no finetune": ["finetune.enabled=false"],  # the block loop alone (docs/ROUNDING.md, Finetune)
    "finetune": ["finetune.enabled=true"],
}
NO_ROTATION = ["calibration.rotation=none"]
RECIPE_ROW = "recipe"
ABLATIONS = {  # name -> recipe overrides, applied to W4A4
    "no MSE": ["calibration.loss.mse=false"],
    "no cosine": ["calibration.loss.cosine=false"],
    "no attention KL": ["calibration.loss.attention_kl=false"],
    "no LWC": ["calibration.lwc.enabled=false"],
    "no LET": ["calibration.let.enabled=false"],
    # nothing off, other calibration windows: how far the perplexity moves by chance at this budget
    "seed 3 (nothing off)": ["calibration.seed=3"],
    "seed 4 (nothing off)": ["calibration.seed=4"],
}


SMOLLM2_LINEARS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # [N, K]


def bits_per_weight(recipe) -> float:
    """Bits per weight of SmolLM2's decoder linears as abq-packed (format 3) stores them, over the real
    columns (`abq inspect`'s bits_per_weight_with_overhead): the planes, plus per row and group a scale
    (16 or 32 bits) and a zero point of `planes` bits; the K padding is left out."""
    from abqcli.btc.format import num_planes

    spec = recipe.weights.quant_spec()
    planes, scale_bits = num_planes(spec.qmax), 16 if spec.scale_dtype == "float16" else 32
    weights = sum(n * k for n, k in SMOLLM2_LINEARS)
    overhead = sum(n * spec.num_groups(k) * (scale_bits + planes) for n, k in SMOLLM2_LINEARS)
    return planes + overhead / weights


def evaluate(args, model: str, recipe_path: str | None = None, sets: list[str] | None = None) -> dict:
    from abqcli.evaluate import EvalRequest, run_eval
    from abqcli.recipe import load_recipe

    recipe = load_recipe(str(ROOT / recipe_path), sets or []) if recipe_path else None
    req = EvalRequest(model, "wikitext2", args.data_dir, args.eval_seqlen, args.limit, "auto", "float32", recipe)
    result = run_eval(req)
    print(f"  {result.mode}: ppl {result.ppl:.3f} ({result.windows} windows, {result.seconds:.0f} s)", flush=True)
    return result.to_dict()


def calibrate(args, recipe_path: str, sets: list[str], workdir: Path) -> dict:
    """Run `abq quantize` in a subprocess; return its summary and the ABQ perplexity."""
    out = workdir / f"run{len(list(workdir.iterdir()))}"
    budget = [f"calibration.{k}={getattr(args, k)}" for k in ("nsamples", "seqlen", "epochs") if getattr(args, k)]
    cmd = [sys.executable, "-m", "abqcli.cli", "quantize", str(ROOT / recipe_path), "--data-dir", args.data_dir,
           "--output", str(out), "--set", "output.formats=[hf-fakequant]", "--json", str(out) + ".json"]
    for s in budget + sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    proc = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *cmd], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"abq quantize failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    summary = json.loads(Path(str(out) + ".json").read_text())
    ppl = evaluate(args, str(out / "hf-fakequant"))
    return {"calibration_seconds": round(wall, 1), "peak_rss_mb": summary["peak_memory_mb"],
            "budget": budget, "ppl": ppl["ppl"], "eval": ppl}


def markdown(results: dict) -> str:
    fp = results["fp"]["ppl"]
    title = (f"SmolLM2-135M, wiki.test.raw, first {results['protocol']['windows']} windows x "
             f"{results['protocol']['seqlen']} tokens. FP perplexity **{fp:.3f}**.")
    lines = [title, "",
             ("| scheme | bits/weight | RTN ppl | RTN + rotation | recipe (ABQ) ppl | recipe rotation "
              "| calibration s | peak RSS MB |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results["schemes"].items():
        if "abq" not in row:
            continue
        rotated = f"{row['rtn_rotated_ppl']:.3f} ({row['rtn_rotated']})" if "rtn_rotated_ppl" in row else "—"
        lines.append(f"| {name} | {row['bits_per_weight']:.2f} | {row['rtn_ppl']:.3f} | {rotated} | "
                     f"{row['abq']['ppl']:.3f} | {row.get('rotation', 'none')} | "
                     f"{row['abq']['calibration_seconds']:.0f} | {row['abq']['peak_rss_mb']:.0f} |")
    lines += variants_markdown(results)
    if results.get("ablation"):
        lines += ["", "Ablation (W4A4):", "", "| variant | ABQ ppl | calibration s |", "|---|---|---|"]
        full = results["schemes"].get("W4A4")
        if full:
            lines.append(f"| full ABQ | {full['abq']['ppl']:.3f} | {full['abq']['calibration_seconds']:.0f} |")
        for name, row in results["ablation"].items():
            lines.append(f"| {name} | {row['ppl']:.3f} | {row['calibration_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def variants_markdown(results: dict) -> list[str]:
    """The rounding rows: perplexity (calibration seconds) per scheme and variant."""
    rows = {name: row for name, row in results["schemes"].items() if row.get("variants")}
    if not rows:
        return []
    lines = ["", "Rounding variants (ppl, calibration seconds, peak RSS MB):", "",
             "| scheme | bits/weight | RTN | " + " | ".join(VARIANTS) + " |", "|---|---|---|" + "---|" * len(VARIANTS)]
    for name, row in rows.items():
        cells = [f"{v['ppl']:.3f} ({v['calibration_seconds']:.0f} s, {v['peak_rss_mb']:.0f} MB)"
                 if (v := row["variants"].get(variant)) else "—" for variant in VARIANTS]
        lines.append(f"| {name} | {row['bits_per_weight']:.2f} | {row['rtn_ppl']:.3f} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {"RTN": {n: r["rtn_ppl"] for n, r in results["schemes"].items() if "bits_per_weight" in r},
              "RTN + rotation": {n: r["rtn_rotated_ppl"] for n, r in results["schemes"].items()
                                 if "rtn_rotated_ppl" in r},
              "recipe": {n: r["abq"]["ppl"] for n, r in results["schemes"].items() if "abq" in r}}
    for variant in VARIANTS:
        series[variant] = {n: r["variants"][variant]["ppl"] for n, r in results["schemes"].items()
                           if variant in r.get("variants", {})}
    for (label, points), marker in zip(series.items(), "x+o^sDv<>p"):
        if not points:
            continue
        xs = [results["schemes"][n]["bits_per_weight"] for n in points]
        ax.scatter(xs, list(points.values()), marker=marker, label=label)
        if label == "RTN":
            for x, y, name in zip(xs, points.values(), points):
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(results["fp"]["ppl"], color="gray", linestyle="--", label="FP")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (planes + scale/zero, abq-packed format 3)")
    ax.set_ylabel("wikitext-2 perplexity (log)")
    ax.set_title("SmolLM2-135M: perplexity against bits per weight")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated subset of " + ", ".join(SCHEMES))
    parser.add_argument("--ablation", default="all",
                        help="W4A4 ablations to run: all, none, or a comma-separated subset of " + ", ".join(ABLATIONS))
    parser.add_argument("--rows", default=RECIPE_ROW,
                        help=f"rows per scheme: {RECIPE_ROW} and/or " + ", ".join(VARIANTS) + " (comma-separated)")
    parser.add_argument("--limit", type=int, default=16, help="evaluation windows")
    parser.add_argument("--no-rtn-rotated", dest="rtn_rotated", action="store_false",
                        help="skip the RTN + rotation row of each scheme")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--nsamples", type=int, help="override the recipes' calibration windows")
    parser.add_argument("--seqlen", type=int, help="override the recipes' calibration window length")
    parser.add_argument("--epochs", type=int, help="override the recipes' epochs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild quality.md and quality.png from an existing (maybe partial) quality.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other rows of an existing quality.json with the same protocol and "
                             "replace only the schemes / ablations run now")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report(json.loads((out / "quality.json").read_text()), out)
        return
    protocol = {"windows": args.limit, "seqlen": args.eval_seqlen, "data_dir": args.data_dir,
                "calibration_overrides": {k: getattr(args, k) for k in ("nsamples", "seqlen", "epochs")}}
    results = {"protocol": protocol, "schemes": {}, "ablation": {}}
    if args.merge and (out / "quality.json").is_file():
        previous = json.loads((out / "quality.json").read_text())
        if previous.get("protocol") != protocol:
            raise SystemExit(f"--merge: quality.json was measured with {previous.get('protocol')}, not {protocol}")
        results.update(previous)
    if "fp" not in results:  # reused with --merge: the FP model does not change between rows
        print("FP", flush=True)
        results["fp"] = evaluate(args, "smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in filter(None, args.schemes.split(",")):
            results["schemes"][name] = scheme_rows(args, name, results["schemes"].get(name), workdir)
            (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")  # keep partial results
        if args.ablation != "none":
            chosen = ABLATIONS if args.ablation == "all" else {n: ABLATIONS[n] for n in args.ablation.split(",") if n}
            for name, sets in chosen.items():
                print(f"W4A4 {name}", flush=True)
                results["ablation"][name] = calibrate(args, SCHEMES["W4A4"], sets, workdir)
                (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results, out)


def scheme_rows(args, name: str, previous: dict | None, workdir: Path) -> dict:
    """One scheme's rows (`--rows`), merged into its previous rows; RTN reused when already measured."""
    from abqcli.recipe import load_recipe

    recipe_path = SCHEMES[name]
    recipe = load_recipe(str(ROOT / recipe_path))
    row = dict(previous or {}, recipe=recipe_path, bits_per_weight=bits_per_weight(recipe),
               rotation=recipe.calibration.rotation)
    row.setdefault("variants", {})
    print(name, flush=True)
    if "rtn_ppl" not in row:
        row["rtn_ppl"] = evaluate(args, "smollm2-135m", recipe_path, NO_ROTATION)["ppl"]
    if "rtn_rotated_ppl" not in row and args.rtn_rotated:
        rotation = recipe.calibration.rotation if recipe.calibration.rotation != "none" else "hadamard"
        row["rtn_rotated"] = rotation
        row["rtn_rotated_ppl"] = evaluate(args, "smollm2-135m", recipe_path, [f"calibration.rotation={rotation}"])["ppl"]
    for wanted in filter(None, args.rows.split(",")):
        if wanted == RECIPE_ROW:
            row["abq"] = calibrate(args, recipe_path, [], workdir)
        else:
            print(f"  {wanted}", flush=True)
            row["variants"][wanted] = calibrate(args, recipe_path, VARIANTS[wanted], workdir)
    return row


def report(results: dict, out: Path) -> None:
    (out / "quality.md").write_text(markdown(results))
    plot(results, out / "quality.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
