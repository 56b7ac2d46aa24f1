"""The `abq` command line: parses, calls library functions, prints with rich. No logic of its own.

Exit codes: 0 ok, 1 failure while running, 2 bad input (recipe, paths, options), 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from abqcli import __version__
from abqcli.distributed import DEFAULT_TIMEOUT_S
from abqcli.errors import EXIT_RUNTIME, AbqError, InputError, RunError
from abqcli.registry import BACKENDS

HELP = """abq: arbitrary-bit (ABQ-LLM) quantization of LLMs into the BTC bit-plane format.

Exit codes: 0 ok, 1 failure while running, 2 bad input, 130 interrupted.
Data: dataset names (wikitext2, c4, ptb) resolve in --data-dir or $ABQ_DATA_DIR.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipe_app = typer.Typer(help="Show or validate recipes (presets or YAML files).", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

out = Console()  # results: tables go to stdout
err = Console(stderr=True)  # progress and messages go to stderr

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="HF model dir, cached hub id, .gguf file, "
                                       "abq output dir, or the alias smollm2-135m.")]
DatasetOpt = Annotated[str, typer.Option(help="Dataset name (wikitext2, c4, ptb) or a text file path.")]
DataDirOpt = Annotated[str | None, typer.Option("--data-dir", help="Folder holding named datasets "
                                                   "(default: $ABQ_DATA_DIR).")]
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a recipe field: key.path=value "
                                           "(YAML value), repeatable.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON to this path.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda if present), cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, float16 or bfloat16.")]
BACKEND_CHOICES = " or ".join(BACKENDS.names()) + " (cupy: CuPy and an sm_80+ GPU)"  # --backend help
PLAIN_LINES = 20  # at most about this many plain progress lines per loop where stderr is not a terminal


def _check_json_path(path: Path | None) -> None:
    """Refuse a --json path that cannot be written, before any model loads: a directory, a parent that is
    a file, a place where no file can be created (probed by opening the file for appending, or a temporary
    file in its nearest existing folder; nothing is left behind). Missing folders are fine: they are made."""
    if path is None:
        return
    try:
        if path.is_dir():
            raise InputError(f"--json {path}: is a directory, expected a file path")
        if path.exists():
            with open(path, "ab"):
                return
        folder = next(p for p in path.parents if p.exists())
        if not folder.is_dir():
            raise InputError(f"--json {path}: {folder} is not a directory")
        with tempfile.TemporaryFile(dir=folder):
            return
    except OSError as exc:
        raise InputError(f"--json {path}: cannot write there ({exc.strerror or exc})") from None


def _write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise RunError(f"cannot write --json {path}: {exc.strerror or exc}") from None
    err.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)


def _format_value(value: object) -> str:
    """Floats with 4 decimals, or in scientific notation when that would hide them (tolerances, errors);
    lists comma-separated ("none" when empty), dicts as "key value, ..."."""
    if isinstance(value, float):
        return f"{value:.3e}" if value != 0.0 and abs(value) < 1e-3 else f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_format_value(v)}" for k, v in value.items())
    return str(value)


def _table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, _format_value(value))
    return table


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err, disable=not err.is_terminal,
    )


def _plain(progress: Progress, text: str) -> None:
    """A progress line on stderr where it is not a terminal (CI logs, pipes), where rich draws no bars."""
    if progress.disable:
        progress.console.print(text, markup=False, highlight=False, soft_wrap=True)


def _status_callback(progress: Progress, task: TaskID) -> Callable[[str], None]:
    """`on_status(text)` for a library call: the phase in the bar's info column, or a plain line."""

    def on_status(text: str) -> None:
        progress.update(task, info=text)
        _plain(progress, text)

    return on_status


def _eval_recipe(recipe: str | None, scheme: str | None, group_size: int | None, sets: list[str]):
    """The recipe that `abq eval` fake-quantizes with, or None for the FP model."""
    from abqcli.recipe import load_recipe

    if recipe and scheme:
        raise InputError("give either --recipe or --scheme, not both")
    if group_size is not None and not scheme:
        raise InputError("--group-size goes with --scheme")
    # eval only fake-quantizes: it writes no format, so no format's layer rule applies
    if scheme:
        extra = [f"weights.group_size={group_size}"] if group_size is not None else []
        return load_recipe(scheme, [*extra, *sets], for_export=False)
    if recipe:
        return load_recipe(recipe, sets, for_export=False)
    if sets:
        raise InputError("--set needs --recipe or --scheme")
    return None


@app.command("eval")
def eval_cmd(
    model: ModelOpt = "smollm2-135m",
    dataset: DatasetOpt = "wikitext2",
    data_dir: DataDirOpt = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    limit: Annotated[int | None, typer.Option(help="Score only the first N windows.")] = None,
    scheme: Annotated[str | None, typer.Option(help="Fake-quantize with RTN at a preset, e.g. w4a16, "
                                                  "w2*a8.")] = None,
    group_size: Annotated[int | None, typer.Option(help="Weight group size with --scheme "
                                                      "(default per channel).")] = None,
    recipe: Annotated[str | None, typer.Option(help="Fake-quantize (RTN) per this recipe file "
                                                  "or preset.")] = None,
    sets: SetOpt = [],  # noqa: B006 - typer needs a literal default
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    backend: Annotated[str, typer.Option(help=f"GEMM backend for packed models: {BACKEND_CHOICES}.")] = "cpu",
    json_path: JsonOpt = None,
) -> None:
    """Perplexity of a model (FP, RTN fake-quant, or an abq output) by the GPTQ/ABQ protocol."""
    from abqcli.evaluate import EvalRequest, run_eval

    _check_json_path(json_path)
    req = EvalRequest(model, dataset, data_dir, seqlen, limit, device, dtype,
                      _eval_recipe(recipe, scheme, group_size, sets), backend)
    with _progress() as progress:
        task = progress.add_task("perplexity", total=None, info="")

        def on_window(i: int, n: int, ppl: float) -> None:
            progress.update(task, total=n, completed=i + 1, info=f"ppl {ppl:.3f}")
            if (i + 1) % max(1, n // PLAIN_LINES) == 0 or i + 1 == n:
                _plain(progress, f"window {i + 1}/{n}: ppl {ppl:.3f}")

        result = run_eval(req, on_window, _status_callback(progress, task))
    out.print(_table("abq eval", result.to_dict()))
    _write_json(json_path, result.to_dict())


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue.")],
    model: ModelOpt = "smollm2-135m",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most (fewer at end of text).")] = 32,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the tokenizer's chat template.")] = False,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: seeded sampling.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling generator.")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    backend: Annotated[str, typer.Option(help=f"GEMM backend for packed models: {BACKEND_CHOICES}.")] = "cpu",
    json_path: JsonOpt = None,
) -> None:
    """Continue a prompt with a model (FP, hf-fakequant, abq-packed or compressed-tensors) and print the
    text and tokens per second: a look at what quantization did to the model."""
    from abqcli.generate import generate

    _check_json_path(json_path)
    result = generate(model, prompt, max_new_tokens, chat, temperature, seed, dtype, device, backend)
    out.print(result.text, markup=False, highlight=False, soft_wrap=True)
    err.print(f"{result.new_tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_second:.2f} tokens/s "
              f"({result.mode})", markup=False, highlight=False, soft_wrap=True)
    _write_json(json_path, result.to_dict())


class RichCalibrationProgress:
    """Renders the calibration loop: one bar per block, then a line with loss first -> last, time, memory.

    Blocks are shown counted from 1 (`block 1/30`); quant_log.json keeps the 0-based index as data."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None
        self.num_blocks = 0

    def _name(self, block: int) -> str:
        return f"block {block + 1}/{self.num_blocks}"

    def _start(self, name: str, steps: int, line: str) -> None:
        self.task = self.progress.add_task(name, total=steps, info="")
        _plain(self.progress, line)

    def _advance(self, info: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, advance=1, info=info)

    def _end(self, line: str) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def block_start(self, block: int, num_blocks: int, steps: int) -> None:
        self.num_blocks = num_blocks
        self._start(self._name(block), steps,
                    f"{self._name(block)}: " + (f"training {steps} steps" if steps else "rounding"))

    def step(self, block: int, epoch: int, step: int, loss: float) -> None:
        self._advance(f"epoch {epoch + 1} loss {loss:.5f}")

    def block_end(self, log) -> None:
        loss = "rounded" if log.loss_first is None else f"loss {log.loss_first:.5f} -> {log.loss_last:.5f}"
        self._end(f"{self._name(log.block)}: {loss}, {log.seconds:.1f} s, peak {log.peak_memory_mb:.0f} MB")

    def finetune_start(self, steps: int) -> None:
        self._start("finetune", steps, f"finetune: training the scales end to end, {steps} steps")

    def finetune_step(self, step: int, loss: float) -> None:
        self._advance(f"KL {loss:.5f}")

    def finetune_end(self, log) -> None:
        worse = ""
        if log.loss_last > log.loss_first:  # two windows: a hint, not a verdict (the W4A16 g128 recipe's
            # KL rises while its perplexity falls)
            worse = (" (higher after training on these two windows: finetune.lr may be too high; compare the "
                     "perplexity with finetune.enabled: false or a lower rate)")
        self._end(f"finetune: KL of the first step's windows {log.loss_first:.5f} -> {log.loss_last:.5f}, "
                  f"{log.seconds:.1f} s{worse}")


@app.command("quantize")
def quantize_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or preset name (w4a4, w2*a8, ...).")],
    sets: SetOpt = [],  # noqa: B006
    data_dir: DataDirOpt = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output directory "
                                                  "(overrides output.dir).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing abq output directory (once the new "
                                            "one is complete).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its checkpoint "
                                         "(same model, recipe and data); with no checkpoint yet, "
                                         "start from the beginning.")] = False,
    json_path: JsonOpt = None,
    dist_timeout: Annotated[int, typer.Option(
        min=1, help="Under torchrun: seconds a process waits for the others at a synchronisation point before "
                    "it stops (a dead process must not hang the rest).")] = DEFAULT_TIMEOUT_S,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", help="RAM the activation caches may take (e.g. 8GB) before calibration.cache: auto keeps "
                             "them in memory-mapped files under the output (default: half the RAM).")] = None,
) -> None:
    """Calibrate a model with ABQ (or RTN) per a recipe and write the requested formats.

    A checkpoint is written after every block: after Ctrl-C or a crash, run the same command with
    --resume. The output directory gets recipe.yaml, quant_log.json and one folder per format.
    Data-parallel over N processes: torchrun --nproc-per-node N -m abqcli quantize RECIPE (README).
    """
    from abqcli.distributed import DataParallel
    from abqcli.pipeline import QuantizeInterrupted, run_quantize
    from abqcli.quant.cache import parse_size
    from abqcli.recipe import load_recipe

    _check_json_path(json_path)
    memory_budget = parse_size(max_memory) if max_memory is not None else None
    if output is not None and not output.strip():
        raise InputError("--output is empty: give the output directory")
    resolved = load_recipe(recipe, [*sets, *([f"output.dir={output}"] if output is not None else [])])
    ranks = DataParallel.from_environment(resolved.calibration.device, dist_timeout)
    try:
        if ranks.rank != 0:
            _quantize_other_rank(resolved, data_dir, overwrite, resume, ranks, memory_budget)
        else:
            _print_quantize_header(resolved, ranks)
            try:
                with _progress() as progress:
                    summary = run_quantize(resolved, data_dir, overwrite, resume, RichCalibrationProgress(progress),
                                           lambda line: err.print(line, markup=False, highlight=False,
                                                                  soft_wrap=True),
                                           ranks, memory_budget)
            except QuantizeInterrupted as exc:
                err.print(exc.advice, markup=False, highlight=False, soft_wrap=True)
                raise
        # leave together (the others wait for rank 0's export, up to --dist-timeout): a rank tearing gloo
        # down while rank 0 still runs could abort
        ranks.barrier()
    finally:
        ranks.close()
    if ranks.rank != 0:
        return
    rows = {k: v for k, v in summary.items() if k not in ("blocks", "provenance", "outputs")}
    rows.update({f"output {k}": v for k, v in summary["outputs"].items()})
    out.print(_table("abq quantize", rows))
    _write_json(json_path, summary)


def _print_quantize_header(recipe, ranks) -> None:
    from abqcli.recipe import describe

    rotation = recipe.calibration.rotation
    processes = f", {ranks.world} processes ({ranks.backend}), this is rank 0: it writes the output" \
        if ranks.active else ""
    err.print(f"abq quantize: {describe(recipe)}, method {recipe.calibration.method}, "
              + (f"{rotation} rotation, " if rotation != "none" else "")
              + (f"finetune {recipe.finetune.steps} steps, " if recipe.finetune.enabled else "")
              + f"model {recipe.model.path} -> {recipe.output.dir}{processes}", markup=False, highlight=False)


def _quantize_other_rank(recipe, data_dir, overwrite: bool, resume: bool, ranks, max_memory: int | None) -> None:
    """A rank other than 0: calibrate its share of the windows quietly (rank 0 shows the progress and
    writes the output); one line when it starts and when it is done."""
    from abqcli.pipeline import run_quantize

    err.print(f"abq quantize {ranks.label}: calibrating its share of the windows; rank 0 writes "
              f"{recipe.output.dir}", markup=False, highlight=False, soft_wrap=True)
    done = run_quantize(recipe, data_dir, overwrite, resume, None, None, ranks, max_memory)
    if done:
        err.print(f"abq quantize {ranks.label}: done, {done['windows_per_process']} windows in {done['seconds']} s",
                  markup=False, highlight=False, soft_wrap=True)


@app.command("pack")
def pack_cmd(
    directory: Annotated[Path, typer.Argument(help="An hf-fakequant output directory of abq quantize.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the abq-packed export.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing abq output directory (once the new "
                                            "one is complete).")] = False,
    fmt: Annotated[str, typer.Option("--format", help="abq-packed (BTC bit planes, abq's runtime) or "
                                     "compressed-tensors (transformers / vLLM).")] = "abq-packed",
) -> None:
    """Pack an hf-fakequant output into the BTC bit-plane format (abq-packed) or compressed-tensors."""
    from abqcli.formats.abq_packed import pack_fakequant

    if fmt not in ("abq-packed", "compressed-tensors"):
        raise InputError(f"--format {fmt}: expected abq-packed or compressed-tensors")
    written = pack_fakequant(directory, output, overwrite, fmt)
    out.print(f"wrote {written}", markup=False, highlight=False, soft_wrap=True)


@app.command("verify")
def verify_cmd(
    directory: Annotated[Path, typer.Argument(help="An abq-packed export (or an output dir holding one).")],
    backend: Annotated[str, typer.Option(help=f"GEMM backend to verify: {BACKEND_CHOICES}.")] = "cpu",
    dataset: DatasetOpt = "wikitext2",
    data_dir: DataDirOpt = None,
    windows: Annotated[int, typer.Option(help="Windows for the logits / perplexity comparison.")] = 2,
    seqlen: Annotated[int | None, typer.Option(help="Window length (default min(512, context)).")] = None,
    json_path: JsonOpt = None,
) -> None:
    """Prove a packed export computes what its fake-quant model computes.

    Per quantized linear: the packed integer GEMM on captured real inputs must equal the exact integer
    reference bit for bit, and the float output must match the fake-quant layer. End to end: logits
    (max relative difference) and perplexity against fake-quant. Exit 1 on any failure.
    """
    from abqcli.verify import verify_export

    _check_json_path(json_path)
    with _progress() as progress:
        on_status = _status_callback(progress, progress.add_task("verifying", total=None, info=""))
        report = verify_export(directory, backend, data_dir, dataset, windows, seqlen, on_status=on_status)
    summary = {k: v for k, v in report.to_dict().items() if k != "layers"}
    out.print(_table("abq verify", summary))
    _write_json(json_path, report.to_dict())
    if not report.ok:
        raise RunError("verification failed: " + "; ".join(report.problems))


@app.command("inspect")
def inspect_cmd(
    directory: Annotated[Path, typer.Argument(help="An abq-packed export (or an output dir holding one).")],
    json_path: JsonOpt = None,
) -> None:
    """Per-layer bits, planes, group size, scale dtype and bytes; bits per weight over the real columns
    (codes + scale/zero overhead), the cost of padding K to a multiple of 128 on its own line; size
    against fp16."""
    from abqcli.verify import inspect_export

    _check_json_path(json_path)
    report = inspect_export(directory)
    table = Table(title="abq inspect: layers (bytes and more per layer: --json)")
    columns = {"bits": "bits", "group_size": "group", "act_bits": "act", "scale_dtype": "scales",
               "bits_per_weight_with_overhead": "bits/w", "padding_bits_per_weight": "pad"}
    table.add_column("layer", overflow="fold", min_width=28)
    for title in columns.values():
        table.add_column(title, justify="right")
    for name, row in report["layers"].items():
        table.add_row(name, *(_format_value(row.get(c)) for c in columns))
    out.print(table)
    totals = report["totals"]
    out.print(_table("abq inspect", {k: v for k, v in report.items() if k not in ("layers", "totals")}))
    out.print(_table("abq inspect: totals", totals))
    if totals["quantized_weights"]:
        out.print(f"bits per weight {totals['bits_per_weight_with_overhead']:.3f} over the real columns "
                  f"(codes {totals['bits_per_weight']:.3f} + scales/zeros {totals['overhead_bits_per_weight']:.3f}); "
                  f"K padding to a multiple of 128 adds {totals['padding_bits_per_weight']:.3f} "
                  f"(stored {totals['stored_bits_per_weight']:.3f})")
    _write_json(json_path, report)


bench_app = typer.Typer(help="Benchmarks that need no test harness.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("gemm")
def bench_gemm_cmd(
    output: Annotated[Path, typer.Option("--out", help="Where to write gpu-gemm-*.json and .md.")] = Path(
        "benchmarks/results"),
    quick: Annotated[bool, typer.Option(help="One shape, M in {1, 16, 256}, fewer iterations.")] = False,
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 10,
    iters: Annotated[int, typer.Option(help="Timed calls (median reported).")] = 50,
) -> None:
    """Time the BTC GEMM against torch fp16 matmul (cuBLAS) and torch._int_mm (int8) on a GPU.

    LLaMA-7B shapes (N x K = 4096x4096, 11008x4096, 4096x11008) at M = 1, 8, 16, 64, 256; CUDA events,
    warm-up, median. Needs CuPy and an sm_80+ GPU.
    """
    from abqcli.bench_gemm import run_gemm_bench, summary

    doc = run_gemm_bench(output, quick, warmup, iters)
    out.print(summary(doc), markup=False, highlight=False, soft_wrap=True)


@recipe_app.command("show")
def recipe_show(
    spec: Annotated[str, typer.Argument(help="Preset name (w4a4, w2*a8, ...) or YAML file.")],
    sets: SetOpt = [],  # noqa: B006
) -> None:
    """Print the resolved recipe (defaults filled in) as YAML."""
    from abqcli.recipe import dump_recipe, load_recipe

    out.print(dump_recipe(load_recipe(spec, sets)), markup=False, highlight=False, end="", soft_wrap=True)


@recipe_app.command("validate")
def recipe_validate(
    spec: Annotated[str, typer.Argument(help="YAML file (or preset name) to check.")],
    sets: SetOpt = [],  # noqa: B006
) -> None:
    """Check a recipe; exit 0 if valid, 2 with the offending key path if not."""
    from abqcli.recipe import describe, load_recipe

    out.print(f"ok: {spec} ({describe(load_recipe(spec, sets))})", markup=False, highlight=False, soft_wrap=True)


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False):
    if version:
        out.print(f"abq {__version__}")
        raise typer.Exit(0)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: every error becomes one line on stderr and an exit code.

    Usage errors, --help and Ctrl-C are handled by typer (standalone mode, which ends in SystemExit);
    abq's own errors carry their exit code; anything else is reported in one line, exit 1.
    """
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="abq", standalone_mode=True)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_RUNTIME)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return 130
    except AbqError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except Exception as exc:
        if os.environ.get("ABQ_DEBUG"):
            raise
        err.print(f"error: {type(exc).__name__}: {exc} (set ABQ_DEBUG=1 for the traceback)",
                  markup=False, highlight=False, soft_wrap=True)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
