"""`abq quantize` end to end on tiny models, through the CLI entry point `abqcli.cli.main`.

Runs are small (2 blocks, 4 windows of 32 tokens, 5 epochs of one full-batch step) and use one torch
thread: on a shared 2-core machine, 2 threads make every tiny op ~10x slower. Outputs that are compared
byte for byte are written to the relative directory `out` of different working directories, so that the
resolved recipe (which records output.dir) is the same for both.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from abqcli import cli
from abqcli.quant.methods import abq as abq_method

# lrs raised from the defaults (and compensation lowered: b = 1 makes a·bᵀ move every output of OPT's
# fc2, whose input is a non-negative ReLU output, by a_i·Σx) so that 5 full-batch steps on a random
# tiny model visibly lower the loss of every block
RECIPE = """\
model: {{path: {model}}}
scheme: {scheme}
{extra}
calibration:
  dataset: {text}
  nsamples: 4
  seqlen: 32
  epochs: 5
  batch_size: {batch_size}
  device: cpu
  lwc: {{lr: 5.0e-2}}
  let: {{lr: 1.0e-2}}
  compensation: {{lr: 1.0e-3}}
{calibration}
output: {{dir: out, formats: [hf-fakequant]}}
"""

# (model, scheme, extra recipe lines): W4A4 on every family, and one weight-only grouped run
CASES = [
    ("llama", "w4a4", ""),
    ("qwen2", "w4a4", ""),
    ("opt", "w4a4", ""),
    ("opt", "w3a16", "weights: {group_size: 32}"),
]
CASE_IDS = ["llama-w4a4", "qwen2-w4a4", "opt-w4a4", "opt-w3a16g32"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_recipe(workdir: Path, model: Path, text: Path, scheme: str = "w4a4", extra: str = "",
                 batch_size: int = 4, calibration: str = "") -> Path:
    """The recipe above; `calibration`: more keys of the calibration section, e.g. "rounding: gptq"."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "recipe.yaml"
    lines = "".join(f"  {line}\n" for line in calibration.split("\n") if line)
    path.write_text(RECIPE.format(model=model, scheme=scheme, extra=extra, text=text, batch_size=batch_size,
                                  calibration=lines.rstrip("\n")))
    return path


def abq(workdir: Path, *args: str) -> int:
    """`abq ARGS` run in-process with `workdir` as the current directory; returns the exit code."""
    with contextlib.chdir(workdir):
        return cli.main([str(a) for a in args])


def error_line(stderr: str) -> str:
    """The one `error:` line of a failed command (and there must be exactly one, and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def flat(text: str) -> str:
    """Rich wraps long lines at the console width: compare with whitespace collapsed."""
    return " ".join(text.split())


def dir_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_files(a: Path, b: Path) -> None:
    files_a, files_b = dir_bytes(a), dir_bytes(b)
    assert sorted(files_a) == sorted(files_b)
    different = [name for name in files_a if files_a[name] != files_b[name]]
    assert not different, f"files differ between {a} and {b}: {different}"


def losses(out: Path) -> list[tuple]:
    log = json.loads((out / "quant_log.json").read_text())
    return [(b["block"], b["loss_first"], b["loss_last"], b["loss_terms_last"]) for b in log["blocks"]]


class Runs:
    """Completed runs, each made once per module: `get(model, scheme, extra)` -> its output dir."""

    def __init__(self, root: Path, models: dict[str, Path], text: Path):
        self.root, self.models, self.text = root, models, text
        self.done: dict[tuple, Path] = {}

    def recipe(self, workdir: Path, model: str, scheme: str = "w4a4", extra: str = "", **kw) -> Path:
        return write_recipe(workdir, self.models[model], self.text, scheme, extra, **kw)

    def get(self, model: str, scheme: str = "w4a4", extra: str = "", calibration: str = "") -> Path:
        key = (model, scheme, extra, calibration)
        if key not in self.done:
            work = self.root / f"run{len(self.done)}"
            rc = abq(work, "quantize", self.recipe(work, model, scheme, extra, calibration=calibration))
            assert rc == 0
            self.done[key] = work / "out"
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, tiny_text_file) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), tiny_models, tiny_text_file)


def first_window(directory: Path, text: Path, seqlen: int = 32) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return tokenizer(text.read_text(), return_tensors="pt").input_ids[:, :seqlen]


# ------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_quantize_output_layout(runs, case):
    out = runs.get(*case)
    assert sorted(p.name for p in out.iterdir()) == ["abq-output.json", "hf-fakequant", "quant_log.json",
                                                     "recipe.yaml"]
    fq = out / "hf-fakequant"
    for name in ("config.json", "model.safetensors", "quant_state.safetensors", "abq.json", "recipe.yaml"):
        assert (fq / name).is_file(), name
    manifest = json.loads((fq / "abq.json").read_text())
    assert manifest["format"] == "hf-fakequant"
    per_block = 7 if case[0] != "opt" else 6
    assert len(manifest["layers"]) == 2 * per_block
    assert not any("lm_head" in name for name in manifest["layers"])
    scheme_bits = int(case[1][1])
    assert {meta["bits"] for meta in manifest["layers"].values()} == {scheme_bits}
    log = json.loads((out / "quant_log.json").read_text())
    assert [b["block"] for b in log["blocks"]] == [0, 1]
    assert log["method"] == "abq"
    assert (out / "recipe.yaml").read_text() == (fq / "recipe.yaml").read_text()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_falls_in_every_block(runs, case):
    log = json.loads((runs.get(*case) / "quant_log.json").read_text())
    assert len(log["blocks"]) == 2
    for block in log["blocks"]:
        assert math.isfinite(block["loss_first"]) and math.isfinite(block["loss_last"])
        assert block["loss_last"] < block["loss_first"], block
        assert set(block["loss_terms_last"]) == {"mse_1", "mse_2", "cos_1", "cos_2", "kl_fwd", "kl_rev"}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_output_loads_with_plain_transformers_and_abq_reapplies_quantization(runs, case, tiny_text_file):
    from transformers import AutoModelForCausalLM

    from abqcli.formats.hf_fakequant import open_fakequant

    fq = runs.get(*case) / "hf-fakequant"
    window = first_window(fq, tiny_text_file)
    plain = AutoModelForCausalLM.from_pretrained(fq, local_files_only=True, dtype=torch.float32).eval()
    assert type(plain).__module__.startswith("transformers.")
    quantized, _, manifest = open_fakequant(fq, "float32", "cpu")
    with torch.no_grad():
        plain_logits = plain(window).logits
        abq_logits = quantized(window).logits
    assert torch.isfinite(plain_logits).all() and torch.isfinite(abq_logits).all()
    # the saved weights are the quantized ones: both loads hold the very same tensors
    quantized_sd = quantized.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, quantized_sd[name]), name
    if case[1].endswith("a16"):
        # weight-only, kv off: nothing to re-apply, abq's load computes what transformers computes
        assert manifest["kv_bits"] == 16
        torch.testing.assert_close(abq_logits, plain_logits, rtol=1e-4, atol=1e-4)
    else:
        # A4 activations and kv are re-applied from the metadata: the logits must change
        assert manifest["kv_bits"] == 4
        assert (abq_logits - plain_logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[3]])
def test_abq_eval_on_the_output(runs, case, tiny_text_file, tmp_path, capsys):
    fq = runs.get(*case) / "hf-fakequant"
    result = tmp_path / "eval.json"
    rc = abq(tmp_path, "eval", "--model", fq, "--dataset", tiny_text_file, "--seqlen", "32", "--limit", "2",
             "--device", "cpu", "--json", result)
    assert rc == 0, capsys.readouterr().err
    data = json.loads(result.read_text())
    assert data["mode"].startswith("calibrated fake-quant")
    assert data["windows"] == 2 and data["tokens_scored"] == 62
    assert math.isfinite(data["ppl"]) and data["ppl"] > 1


def test_two_identical_runs_are_byte_identical(runs, tmp_path):
    reference = runs.get("llama")
    rc = abq(tmp_path, "quantize", runs.recipe(tmp_path, "llama"))
    assert rc == 0
    assert_same_files(reference / "hf-fakequant", tmp_path / "out" / "hf-fakequant")
    assert losses(reference) == losses(tmp_path / "out")


# ------------------------------------------------------------------------------------------ resume


def interrupt_after_block(monkeypatch, block: int) -> None:
    """Ctrl-C right after `block` was checkpointed (the progress callback runs after the save)."""
    original = cli.RichCalibrationProgress.block_end

    def block_end(self, log):
        original(self, log)
        if log.block == block:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.RichCalibrationProgress, "block_end", block_end)


def checkpoint_blocks(out: Path) -> int:
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    files = sorted(p.name for p in (out / "checkpoint").glob("block_*.safetensors"))
    assert files == [f"block_{i:04d}.safetensors" for i in range(len(state["done"]))]
    assert len(state["log"]) == len(state["done"])
    return len(state["done"])


def test_ctrl_c_exits_130_and_says_to_resume(runs, tmp_path, monkeypatch, capsys):
    recipe = runs.recipe(tmp_path, "llama")
    capsys.readouterr()
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 0)
        rc = abq(tmp_path, "quantize", recipe)
    err = flat(capsys.readouterr().err)
    assert "interrupted" in err and "rerun with --resume" in err
    assert checkpoint_blocks(tmp_path / "out") == 1
    assert rc == 130


# every rounding mode: ABQ with nearest (the default), GPTQ and learned rounding, and the gptq method; and
# learned rounding trained under bf16 autocast
ROUNDINGS = ["", "rounding: gptq", "rounding: learned", "method: gptq", "rounding: learned\nautocast: bfloat16"]
ROUNDING_IDS = ["abq-nearest", "abq-gptq", "abq-learned", "gptq", "abq-learned-bf16"]


@pytest.mark.parametrize("calibration", ROUNDINGS, ids=ROUNDING_IDS)
def test_interrupt_then_resume_is_byte_identical(runs, tmp_path, monkeypatch, capsys, calibration):
    reference = runs.get("llama", calibration=calibration)
    recipe = runs.recipe(tmp_path, "llama", calibration=calibration)
    out = tmp_path / "out"
    capsys.readouterr()
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 0)
        abq(tmp_path, "quantize", recipe)  # the exit code is checked in test_ctrl_c_exits_130_and_says_to_resume
    assert "rerun with --resume" in flat(capsys.readouterr().err)
    assert checkpoint_blocks(out) == 1
    assert not (out / "hf-fakequant").exists()
    assert not (out / "quant_log.json").exists()

    # running again without --resume refuses to clobber the checkpoint, and says what to do
    rc = abq(tmp_path, "quantize", recipe)
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "output directory exists" in line and "--resume" in line
    assert checkpoint_blocks(out) == 1

    rc = abq(tmp_path, "quantize", recipe, "--resume")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "block 1/2:" not in err and "block 2/2:" in err  # block 0 came from the checkpoint
    assert not (out / "checkpoint").exists()
    assert_same_files(reference / "hf-fakequant", out / "hf-fakequant")
    assert losses(reference) == losses(out)
    assert (out / "recipe.yaml").read_bytes() == (reference / "recipe.yaml").read_bytes()


def test_resume_after_the_last_block_only_exports(runs, tmp_path, monkeypatch, capsys):
    reference = runs.get("llama")
    recipe = runs.recipe(tmp_path, "llama")
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 1)
        abq(tmp_path, "quantize", recipe)
    assert checkpoint_blocks(tmp_path / "out") == 2
    capsys.readouterr()
    assert abq(tmp_path, "quantize", recipe, "--resume") == 0
    assert not re.search(r"^block \d+/\d+:", capsys.readouterr().err, re.MULTILINE)  # nothing left to train
    assert_same_files(reference / "hf-fakequant", tmp_path / "out" / "hf-fakequant")


def test_nan_loss_names_block_epoch_step_and_resume_completes(runs, tmp_path, monkeypatch, capsys):
    # batch_size 2: two steps per epoch, 5 epochs -> calls 0..9 are block 0; call 13 is block 1, epoch 1, step 1
    recipe = runs.recipe(tmp_path, "llama", batch_size=2)
    out = tmp_path / "out"
    real = abq_method.batch_means
    calls = itertools.count()

    def nan_means(*args, **kwargs):  # one call per step
        means = real(*args, **kwargs)
        return dict.fromkeys(means, float("nan")) if next(calls) == 13 else means

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(abq_method, "batch_means", nan_means)
        rc = abq(tmp_path, "quantize", recipe)
    line = error_line(capsys.readouterr().err)
    assert rc == 1
    assert "non-finite loss at block 1, epoch 1, step 1" in line
    assert "--resume" in line
    assert checkpoint_blocks(out) == 1
    assert not (out / "hf-fakequant").exists()

    rc = abq(tmp_path, "quantize", recipe, "--resume")
    assert rc == 0, capsys.readouterr().err
    assert not (out / "checkpoint").exists()
    log = json.loads((out / "quant_log.json").read_text())
    assert [b["block"] for b in log["blocks"]] == [0, 1]
    assert all(math.isfinite(b["loss_last"]) for b in log["blocks"])
    assert (out / "hf-fakequant" / "abq.json").is_file()


# ------------------------------------------------------------------------------------------ bad inputs


def test_resume_with_a_changed_recipe_is_refused(runs, tmp_path, monkeypatch, capsys):
    recipe = runs.recipe(tmp_path, "llama")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 0)
        abq(tmp_path, "quantize", recipe)
    recipe_before = (out / "recipe.yaml").read_bytes()
    state_before = (out / "checkpoint" / "state.json").read_bytes()
    capsys.readouterr()
    rc = abq(tmp_path, "quantize", recipe, "--resume", "--set", "calibration.seed=3")
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "cannot resume" in line and "different model, recipe or calibration data" in line
    # nothing was touched: the checkpoint and the recorded recipe are still those of the first run
    assert (out / "checkpoint" / "state.json").read_bytes() == state_before
    assert (out / "recipe.yaml").read_bytes() == recipe_before
    assert checkpoint_blocks(out) == 1


def test_resume_with_nothing_to_resume(runs, tmp_path, capsys):
    # no output yet: --resume starts from the beginning and says so (a CI retry loop can always resume)
    recipe = runs.recipe(tmp_path, "llama")
    rc = abq(tmp_path, "quantize", recipe, "--resume")
    err = flat(capsys.readouterr().err)
    assert rc == 0, err
    assert "nothing to resume" in err and "starting from the beginning" in err
    assert_same_files(runs.get("llama") / "hf-fakequant", tmp_path / "out" / "hf-fakequant")
    # a completed output of this very recipe: nothing to do, nothing touched
    done = runs.get("llama")
    before = dir_bytes(done)
    rc = abq(tmp_path, "quantize", recipe, "--resume", "--output", done)
    assert rc == 0
    assert "already complete" in flat(capsys.readouterr().err)
    assert dir_bytes(done) == before
    # ... of another recipe: refused, nothing touched
    rc = abq(tmp_path, "quantize", recipe, "--resume", "--output", done, "--set", "calibration.seed=3")
    assert rc == 2
    assert "different recipe" in error_line(capsys.readouterr().err)
    assert dir_bytes(done) == before


def test_existing_output_without_overwrite(runs, tmp_path, capsys):
    recipe = runs.recipe(tmp_path, "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old result")
    rc = abq(tmp_path, "quantize", recipe)
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "output directory exists" in line and "--overwrite" in line
    assert (tmp_path / "out" / "keep.txt").read_text() == "old result"
    # --overwrite with an input error must not have deleted the old output either
    rc = abq(tmp_path, "quantize", recipe, "--overwrite", "--set", "weights.group_size=256",
             "--set", "scheme=w4a16")
    assert rc == 2
    error_line(capsys.readouterr().err)
    assert (tmp_path / "out" / "keep.txt").read_text() == "old result"


def test_calibration_text_shorter_than_one_window(runs, tmp_path, capsys, tiny_llama):
    short = tmp_path / "short.txt"
    short.write_text("The cat sees a dog. The dog sees a cat.\n")
    recipe = write_recipe(tmp_path, tiny_llama, short)
    rc = abq(tmp_path, "quantize", recipe)
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "fewer than one window of seqlen 32" in line
    assert not (tmp_path / "out").exists()


def test_group_size_larger_than_the_layer_input(runs, tmp_path, capsys):
    recipe = runs.recipe(tmp_path, "llama", "w4a16", "weights: {group_size: 256}")
    rc = abq(tmp_path, "quantize", recipe)
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "group_size 256 is larger than the input size (64)" in line
    assert "model.layers.0.self_attn.q_proj" in line
    assert not (tmp_path / "out").exists()


def test_override_pattern_that_matches_no_layer(runs, tmp_path, capsys):
    recipe = runs.recipe(tmp_path, "llama", extra='overrides: {"*.nonexistent_proj": {weights: {bits: 8}}}')
    rc = abq(tmp_path, "quantize", recipe)
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "nonexistent_proj" in line and "matches no linear layer" in line
    assert not (tmp_path / "out").exists()


def test_block_lacking_a_module_the_adapter_needs(runs, tmp_path, monkeypatch, capsys):
    from abqcli.models import loading

    real = loading.load_model

    def load_without_up_proj(*args, **kwargs):
        model, tokenizer, source = real(*args, **kwargs)
        del model.model.layers[1].mlp.up_proj
        return model, tokenizer, source

    monkeypatch.setattr(loading, "load_model", load_without_up_proj)
    rc = abq(tmp_path, "quantize", runs.recipe(tmp_path, "llama"))
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "cannot map block 1" in line and "mlp.up_proj" in line
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, capsys, gpt2_dir, tiny_text_file):
    rc = abq(tmp_path, "quantize", write_recipe(tmp_path, gpt2_dir, tiny_text_file))
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "unsupported architecture" in line and "gpt2" in line
    assert not (tmp_path / "out").exists()


def test_fp_chain_target_trains_on_y_1_alone(runs):
    log = json.loads((runs.get("llama", "w4a16", calibration="loss: {targets: fp_chain}") / "quant_log.json")
                     .read_text())
    for block in log["blocks"]:
        assert block["loss_last"] < block["loss_first"], block
        assert set(block["loss_terms_last"]) == {"mse_1", "cos_1", "kl_fwd", "kl_rev"}


def test_unknown_loss_target_is_refused(runs, tmp_path, capsys):
    rc = abq(tmp_path, "quantize", runs.recipe(tmp_path, "llama"), "--set", "calibration.loss.targets=y_3")
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "calibration.loss.targets" in line and "fp_chain" in line
    assert not (tmp_path / "out").exists()


def test_every_loss_term_off_is_refused(runs, tmp_path, capsys):
    rc = abq(tmp_path, "quantize", runs.recipe(tmp_path, "llama"), "--set", "calibration.loss.mse=false",
             "--set", "calibration.loss.cosine=false", "--set", "calibration.loss.attention_kl=false")
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "calibration.loss" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [".inf", "-1", "0", "abc"])
def test_non_finite_or_non_positive_lr_is_refused_by_validation(runs, tmp_path, capsys, value):
    rc = abq(tmp_path, "quantize", runs.recipe(tmp_path, "llama"), "--set", f"calibration.lwc.lr={value}")
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "calibration.lwc.lr" in line
    assert not (tmp_path / "out").exists()
