"""Peak memory of `abq quantize` on a model bigger than what its float32 load leaves room for: a synthetic
LLaMA-architecture checkpoint of about 1.5 B parameters (random weights, bf16, sharded safetensors, the
SmolLM2 tokenizer) quantized with `model.loading: blockwise`, under `/usr/bin/time -v`.

A benchmark script, not a test: it measures and writes numbers.

    python benchmarks/big_model_memory.py --data-dir ../shared/data [--work /tmp/abq-big] [--layers 26]

Measured, each in its own process: the peak RSS of loading the checkpoint in float32 (abq's
`load_model`, what `model.loading: full` holds before calibrating), of the bare runtime (python with
torch, transformers and abq imported), of an RTN run and of a 1-epoch, 2-window ABQ run (both
blockwise, W4A8 per-channel, abq-packed), and `abq verify` of the ABQ export. The prediction beside them is the README's
formula without the training state: runtime + max(weights outside the blocks in bf16, 2 × one block in
float32 + the activation caches, 5 · n · T · H · 2 bytes in bf16). Then SmolLM2 (`configs/smollm2-w4a16-g128.yaml` at a small
budget) with `model.loading: full` and `blockwise`. Writes benchmarks/results/big-model-memory.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "big-model-memory.json"
# ~1.5 B parameters: 26 blocks of 51.4 M (hidden 2048, MLP 5632, 16 heads) + 2 × 100.7 M embeddings
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
         "max_position_embeddings": 2048}
SEQLEN, WINDOWS = 512, 2


def build_checkpoint(directory: Path, layers: int) -> dict:
    """The synthetic checkpoint (skipped when `directory` already holds it); its parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from abqcli.models.loading import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    config = LlamaConfig(**SHAPE, num_hidden_layers=layers, vocab_size=len(tokenizer), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if not (directory / "model.safetensors.index.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # transformers' init, std 0.02
        model.save_pretrained(directory, max_shard_size="1GB")
        tokenizer.save_pretrained(directory)
        del model
    per_block = 4 * SHAPE["hidden_size"] ** 2 + 3 * SHAPE["hidden_size"] * SHAPE["intermediate_size"] \
        + 2 * SHAPE["hidden_size"]
    outside = 2 * len(tokenizer) * SHAPE["hidden_size"] + SHAPE["hidden_size"]
    return {"layers": layers, "parameters": layers * per_block + outside, "block_parameters": per_block,
            "outside_block_parameters": outside}


def timed(cmd: list[str], log: Path) -> dict:
    """Wall seconds, peak RSS (MiB) and exit code of `cmd` under /usr/bin/time -v."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    log.write_text(done.stdout + done.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
    return {"exit": done.returncode, "seconds": round(seconds, 1),
            "peak_rss_mb": round(int(peak.group(1)) / 1024, 1) if peak else None}


def write_recipe(path: Path, model: str, method: str, out: Path, loading: str = "blockwise", dtype: str = "bfloat16",
                 scheme: str = "w4a8", group: str = "{group_size: null}", budget: str = "") -> Path:
    path.write_text(
        f"model: {{path: {model}, dtype: {dtype}, loading: {loading}}}\n"
        f"scheme: {scheme}\nweights: {group}\n"
        f"calibration: {{method: {method}, dataset: wikitext2, nsamples: {WINDOWS}, seqlen: {SEQLEN}, epochs: 1, "
        f"batch_size: 1, device: cpu{budget}}}\n"
        f"output: {{dir: {out}, formats: [abq-packed]}}\n")
    return path


def quantize(recipe: Path, data_dir: str, work: Path, name: str) -> dict:
    run = timed([sys.executable, "-m", "abqcli", "quantize", str(recipe), "--data-dir", data_dir, "--overwrite"],
                work / f"{name}.log")
    out = Path(re.search(r"dir: ([^,}]+)", recipe.read_text()).group(1))
    if (out / "quant_log.json").is_file():
        log = json.loads((out / "quant_log.json").read_text())
        run["activation_cache"] = log["activation_cache"]
        run["calibration_seconds"] = log["seconds"]
    return run


def formula_mb(sizes: dict, runtime_mb: float) -> float:
    """The README's prediction (MiB), training state left out: runtime + max(weights outside the blocks in
    bf16, 2 × one block in float32 + the bf16 activation caches)."""
    caches = 5 * WINDOWS * SEQLEN * SHAPE["hidden_size"] * 2
    calibrating = 2 * sizes["block_parameters"] * 4 + caches
    return round(runtime_mb + max(sizes["outside_block_parameters"] * 2, calibrating) / 2**20, 1)


def big_model(work: Path, data_dir: str, layers: int) -> dict:
    """The synthetic checkpoint: float32 load, runtime, RTN, ABQ, and the formula."""
    model = work / "llama-1p5b-bf16"
    sizes = build_checkpoint(model, layers)
    load = f"from abqcli.models.loading import load_model; load_model({str(model)!r}, 'float32')"
    load_fp32 = timed([sys.executable, "-c", load], work / "load-fp32.log")
    runtime = timed([sys.executable, "-c", "import torch, transformers, abqcli.pipeline, abqcli.models.blockwise"],
                    work / "runtime.log")
    rtn = quantize(write_recipe(work / "rtn.yaml", str(model), "rtn", work / "out-rtn"), data_dir, work, "rtn")
    abq = quantize(write_recipe(work / "abq.yaml", str(model), "abq", work / "out-abq"), data_dir, work, "abq")
    return {"checkpoint": {**sizes, "dtype": "bfloat16", "seqlen": SEQLEN, "windows": WINDOWS},
            "load_float32": load_fp32, "runtime": runtime, "rtn_blockwise": rtn, "abq_blockwise": abq,
            "formula_mb": formula_mb(sizes, runtime["peak_rss_mb"]),
            "rtn_vs_float32_load": round(rtn["peak_rss_mb"] / load_fp32["peak_rss_mb"], 3),
            "abq_vs_float32_load": round(abq["peak_rss_mb"] / load_fp32["peak_rss_mb"], 3)}


def verify_big_model(work: Path, data_dir: str) -> dict:
    """`abq verify` of the ABQ export (1 window of 128 tokens), with the export's abq.json sha256."""
    from abqcli.checksums import sha256_file

    verify = timed([sys.executable, "-m", "abqcli", "verify", str(work / "out-abq" / "abq-packed"), "--data-dir",
                    data_dir, "--windows", "1", "--seqlen", "128", "--json", str(work / "verify.json")],
                   work / "verify.log")
    if (work / "verify.json").is_file():
        report = json.loads((work / "verify.json").read_text())
        verify.update({k: report[k] for k in ("ok", "layers_integer_checked", "layers_integer_exact",
                                              "logits_max_rel", "problems")})
    verify["export_abq_json_sha256"] = sha256_file(work / "out-abq" / "abq-packed" / "abq.json")
    return verify


def smollm2(work: Path, data_dir: str) -> dict:
    """SmolLM2 W4A16 g128 ABQ at a small budget, fully loaded and blockwise (float32, as its recipes)."""
    runs = {}
    for loading in ("full", "blockwise"):
        recipe = write_recipe(work / f"smollm2-{loading}.yaml", "smollm2-135m", "abq", work / f"out-smollm2-{loading}",
                              loading, "float32", "w4a16", "{group_size: 128}", ", rounding: learned")
        runs[loading] = quantize(recipe, data_dir, work, f"smollm2-{loading}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--work", default="/tmp/abq-big-model")
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--parts", default="big-model,verify,smollm2",
                        help="which measurements to (re)run; the others are kept from the results file")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    result = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    if "big-model" in parts:
        result["big_model"] = big_model(work, args.data_dir, args.layers)
    if "verify" in parts:
        result["verify_big_model_abq"] = verify_big_model(work, args.data_dir)
    if "smollm2" in parts:
        result["smollm2_w4a16_g128"] = smollm2(work, args.data_dir)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
