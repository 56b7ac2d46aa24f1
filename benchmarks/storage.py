"""Storage of SmolLM2 exports: what `abq inspect` reports for abq-packed (bits per weight over the real
columns — codes plus scale/zero overhead — and the K padding on its own), and the bytes of the
quantized linears of a compressed-tensors export against the same linears in FP16.

A benchmark script, not a test: it measures and writes numbers.

    python benchmarks/storage.py --data-dir ../shared/data [--compressed-tensors OUT/compressed-tensors]

The abq-packed rows are RTN exports of the SmolLM2 recipes (storage does not depend on the calibration
method). Writes benchmarks/results/storage-smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"W4A16 g128": "configs/smollm2-w4a16-g128.yaml", "W3A16 g128": "configs/smollm2-w3a16-g128.yaml",
           "W4A16 per channel": "configs/smollm2-w4a16.yaml"}
KEYS = ("bits_per_weight", "overhead_bits_per_weight", "bits_per_weight_with_overhead", "padding_bits_per_weight",
        "stored_bits_per_weight", "size_vs_fp16")


def packed_storage(recipe: str, data_dir: str, workdir: Path) -> dict:
    """`abq inspect` totals of an RTN abq-packed export of `recipe` (nearest rounding, no rotation)."""
    from abqcli.verify import inspect_export

    out = workdir / Path(recipe).stem
    cmd = [sys.executable, "-m", "abqcli.cli", "quantize", str(ROOT / recipe), "--data-dir", data_dir,
           "--output", str(out), "--set", "calibration.method=rtn", "--set", "calibration.rounding=nearest",
           "--set", "calibration.rotation=none", "--set", "finetune.enabled=false",
           "--set", "output.formats=[abq-packed]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"abq quantize failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    info = inspect_export(out / "abq-packed")
    totals = info["totals"]
    scale_dtypes = sorted({layer["scale_dtype"] for layer in info["layers"].values()})
    return {"recipe": recipe, "format_version": info["format_version"], "scale_dtypes": scale_dtypes,
            "quantized_weights": totals["quantized_weights"], **{k: totals[k] for k in KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--compressed-tensors", help="a compressed-tensors export to measure as well")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "storage-smollm2.json"))
    args = parser.parse_args()

    results: dict = {"abq-packed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in RECIPES.items():
            row = packed_storage(recipe, args.data_dir, Path(tmp))
            results["abq-packed"][name] = row
            print(f"{name}: {row['bits_per_weight_with_overhead']:.3f} bits/weight "
                  f"(codes {row['bits_per_weight']:.3f} + overhead {row['overhead_bits_per_weight']:.3f}), "
                  f"K padding {row['padding_bits_per_weight']:.3f}", flush=True)
    if args.compressed_tensors:
        from abqcli.formats.compressed_tensors import linear_bytes

        quantized, fp16 = linear_bytes(Path(args.compressed_tensors))
        results["compressed-tensors"] = {"directory": Path(args.compressed_tensors).name, "quantized_bytes": quantized,
                                         "fp16_bytes": fp16, "ratio": quantized / fp16}
        print(f"compressed-tensors linears: {quantized / fp16:.3f}x FP16", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
