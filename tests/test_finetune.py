"""The finetune stage (`abqcli.quant.finetune`): end-to-end scale tuning after the block loop.

- it changes only scales: codes and zero points are the block loop's, every scale is stored-precision
  (float16), every saved weight is the dequantized integer state;
- it lowers the KL divergence to the FP model on the calibration windows (weight-only and W4A4 with kv);
- nothing is lost: interrupted in the stage, --resume keeps every checkpointed block and gives the same
  bytes; a resume with other finetune settings re-runs only the stage;
- what it cannot run is refused before the model loads.

Tiny runs (2 blocks, 4 windows x 32 tokens), one torch thread (see test_quantize_cli).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.progress import Progress as RichProgress
from safetensors.torch import load_file

from abqcli.cli import RichCalibrationProgress
from abqcli.errors import InputError, RunError
from abqcli.evaluate import open_model
from abqcli.pipeline import CHECKPOINT_DIR, QuantizeInterrupted, calibration_windows, run_quantize
from abqcli.quant import finetune
from abqcli.quant.calibrate import Progress
from abqcli.recipe import load_recipe
from abqcli.recipe_checks import check_finetune_processes
from test_calibrate import make_recipe, saved_states
from test_quantize_cli import abq, assert_same_files, flat, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FINETUNE = "finetune: {enabled: true, steps: 8, lr: 2.0e-2}"


def quantize(tmp_path: Path, model: Path, text: Path, scheme: str, extra: str, method: str = "rtn",
             sets: tuple[str, ...] = (), progress: Progress | None = None, resume: bool = False) -> Path:
    """A run in `tmp_path` with the relative output `out` (runs in different folders write the same bytes)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(tmp_path):
        make_recipe(Path("recipe.yaml"), model, text, Path("out"), scheme, extra, method)
        run_quantize(load_recipe("recipe.yaml", list(sets)), progress=progress, resume=resume)
    return tmp_path / "out"


def kl_to_fp(output: Path, fp_model: Path, windows: torch.Tensor) -> float:
    """Mean KL(p_FP ‖ p_output) over `windows`."""
    student = open_model(str(output / "hf-fakequant"), "float32", "cpu").model
    teacher = open_model(str(fp_model), "float32", "cpu").model
    with torch.no_grad():
        return float(finetune.distillation_kl(student(windows).logits, teacher(windows).logits))


@pytest.mark.parametrize(("scheme", "extra"), [("w3a16", "weights: {group_size: 48}"), ("w4a4", "")],
                         ids=["w3a16g48", "w4a4"])
def test_finetune_trains_only_the_scales_and_lowers_the_kl(tmp_path, tiny_llama, tiny_text_file, scheme, extra):
    plain = quantize(tmp_path / "plain", tiny_llama, tiny_text_file, scheme, extra)
    tuned = quantize(tmp_path / "tuned", tiny_llama, tiny_text_file, scheme, f"{extra}\n{FINETUNE}")
    before, after = saved_states(plain / "hf-fakequant"), saved_states(tuned / "hf-fakequant")
    assert sorted(before) == sorted(after)
    for name, state in after.items():
        assert torch.equal(state.codes, before[name].codes), name
        assert torch.equal(state.zero, before[name].zero), name
        assert torch.equal(state.scale, state.scale.half().float()), name  # stored precision
    assert any(not torch.equal(after[n].scale, before[n].scale) for n in after)
    weights = load_file(str(tuned / "hf-fakequant" / "model.safetensors"))
    for name, state in after.items():
        assert torch.equal(weights[f"{name}.weight"], state.dequantize()), name
    log = json.loads((tuned / "quant_log.json").read_text())["finetune"]
    assert log["steps"] == 8 and log["loss_last"] < log["loss_first"]
    assert json.loads((plain / "quant_log.json").read_text())["finetune"] is None

    recipe = load_recipe(str(tmp_path / "tuned" / "recipe.yaml"))
    tokenizer = open_model(str(tiny_llama), "float32", "cpu").tokenizer
    windows = calibration_windows(recipe, tokenizer, None).windows
    assert kl_to_fp(tuned, tiny_llama, windows) < kl_to_fp(plain, tiny_llama, windows)


def test_heldout_finetune_trains_on_windows_the_blocks_never_saw(tmp_path, tiny_llama, tiny_text_file, monkeypatch):
    """`finetune.data: heldout`: the stage gets steps x batch_size windows of the calibration text, none of
    them a block-loop window, each once, and still lowers the KL; the export stays its integer state."""
    seen: list[torch.Tensor] = []
    real = finetune.finetune_scales

    def spy(model, teacher, qlinears, states, windows, *args, **kwargs):
        seen.append(windows)
        return real(model, teacher, qlinears, states, windows, *args, **kwargs)

    monkeypatch.setattr(finetune, "finetune_scales", spy)
    extra = f"weights: {{group_size: 48}}\n{FINETUNE}"
    out = quantize(tmp_path / "h", tiny_llama, tiny_text_file, "w3a16", extra, sets=("finetune.data=heldout",))
    recipe = load_recipe(str(tmp_path / "h" / "recipe.yaml"), ["finetune.data=heldout"])
    data = calibration_windows(recipe, open_model(str(tiny_llama), "float32", "cpu").tokenizer, None)
    assert seen[0].shape == (8 * 2, 32) and torch.equal(seen[0], data.finetune_windows)
    block_windows = {tuple(w.tolist()) for w in data.windows}
    assert not block_windows & {tuple(w.tolist()) for w in seen[0]}
    order = torch.cat(finetune.window_order(len(seen[0]), 8, 2, recipe.calibration.seed))
    assert torch.equal(order.sort().values, torch.arange(16))  # each window once
    log = json.loads((out / "quant_log.json").read_text())["finetune"]
    assert log["loss_last"] < log["loss_first"]
    weights = load_file(str(out / "hf-fakequant" / "model.safetensors"))
    for name, state in saved_states(out / "hf-fakequant").items():
        assert torch.equal(weights[f"{name}.weight"], state.dequantize()), name


def test_distillation_kl_is_the_mean_over_tokens_of_kl_teacher_to_student():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(finetune.distillation_kl(student, teacher), expected)
    assert float(finetune.distillation_kl(teacher, teacher)) == pytest.approx(0, abs=1e-6)


def test_the_teacher_runs_in_bf16_only_when_asked(tiny_llama):
    """`autocast` = (model, teacher): the teacher's logits under bf16 autocast (`calibration.autocast_passes`)
    move the KL a little; the model's setting does not touch the teacher."""
    model = open_model(str(tiny_llama), "float32", "cpu").model
    teacher = open_model(str(tiny_llama), "float32", "cpu").model
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        kl = {flags: float(finetune._window_kl(model, teacher, ids, flags)) for flags in
              [(False, False), (False, True), (True, False)]}
    assert kl[False, True] != kl[False, False]
    assert kl[False, True] == pytest.approx(kl[False, False], rel=0.1)
    assert kl[True, False] != kl[False, False]


def test_the_windows_of_each_pass_are_a_seeded_permutation():
    batches = finetune.window_order(5, 7, 2, seed=3)
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == [0, 1, 2, 3, 4]
    assert sorted(torch.cat(batches[3:6]).tolist()) == [0, 1, 2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(batches, finetune.window_order(5, 7, 2, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(batches, finetune.window_order(5, 7, 2, seed=4)))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_learning_rate_of_each_step_follows_the_schedule(tiny_llama, tiny_text_file, tmp_path, schedule):
    path = tmp_path / "recipe.yaml"
    make_recipe(path, tiny_llama, tiny_text_file, tmp_path / "out", "w4a16", FINETUNE)
    spec = load_recipe(str(path), [f"finetune.schedule={schedule}", "finetune.steps=6"]).finetune
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    schedule_of_steps = finetune.learning_rate_schedule(optimizer, spec)
    rates = []
    for _ in range(spec.steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule_of_steps.step()
    if schedule == "constant":
        expected = [spec.lr] * 6
    else:
        expected = [spec.lr * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert rates == pytest.approx(expected, rel=1e-12)


class StopInFinetune(Progress):
    """Ctrl-C at finetune step `step`; records the blocks the loop calibrated."""

    def __init__(self, step: int | None = None):
        self.step_at, self.calibrated = step, []

    def block_start(self, block, num_blocks, steps):
        self.calibrated.append(block)

    def finetune_step(self, step, loss):
        if step == self.step_at:
            raise KeyboardInterrupt


def test_interrupted_finetune_resumes_from_the_blocks_to_the_same_bytes(tmp_path, tiny_llama, tiny_text_file):
    reference = quantize(tmp_path / "ref", tiny_llama, tiny_text_file, "w4a4", FINETUNE, method="abq")
    with pytest.raises(QuantizeInterrupted) as stopped:
        quantize(tmp_path / "run", tiny_llama, tiny_text_file, "w4a4", FINETUNE, method="abq",
                 progress=StopInFinetune(3))
    assert "2 completed block(s) are checkpointed" in stopped.value.advice
    assert (tmp_path / "run" / "out" / CHECKPOINT_DIR).is_dir()
    resumed = StopInFinetune()
    out = quantize(tmp_path / "run", tiny_llama, tiny_text_file, "w4a4", FINETUNE, method="abq",
                   progress=resumed, resume=True)
    assert resumed.calibrated == []  # both blocks came from the checkpoint
    assert_same_files(reference / "hf-fakequant", out / "hf-fakequant")


def test_a_resume_with_other_finetune_settings_reruns_only_the_stage(tmp_path, tiny_llama, tiny_text_file):
    other = ("finetune.lr=5.0e-2",)
    reference = quantize(tmp_path / "ref", tiny_llama, tiny_text_file, "w4a4", FINETUNE, method="abq", sets=other)
    with pytest.raises(QuantizeInterrupted):
        quantize(tmp_path / "run", tiny_llama, tiny_text_file, "w4a4", FINETUNE, method="abq",
                 progress=StopInFinetune(0))
    resumed = StopInFinetune()
    out = quantize(tmp_path / "run", tiny_llama, tiny_text_file, "w4a4", FINETUNE, method="abq", sets=other,
                   progress=resumed, resume=True)
    assert resumed.calibrated == []
    assert_same_files(reference / "hf-fakequant", out / "hf-fakequant")


def test_a_non_finite_finetune_loss_says_what_to_do(tmp_path, tiny_llama, tiny_text_file, monkeypatch):
    monkeypatch.setattr(finetune, "distillation_kl", lambda *a: torch.tensor(math.nan, requires_grad=True))
    with pytest.raises(RunError, match=r"finetune step 0 .* lower finetune\.lr .* --resume"):
        quantize(tmp_path, tiny_llama, tiny_text_file, "w4a16", FINETUNE)
    assert (tmp_path / "out" / CHECKPOINT_DIR).is_dir()  # the blocks are kept


def test_finetune_is_refused_where_it_cannot_run(tmp_path, tiny_llama, tiny_text_file):
    path = tmp_path / "recipe.yaml"
    make_recipe(path, tiny_llama, tiny_text_file, tmp_path / "out", "w4a16", FINETUNE)
    with pytest.raises(InputError, match="finetune trains through the whole model"):
        run_quantize(load_recipe(str(path), ["model.loading=blockwise", "output.formats=[abq-packed]"]))
    with pytest.raises(InputError, match="finetune runs in one process, this run has 2"):
        check_finetune_processes(load_recipe(str(path)), 2)
    with pytest.raises(InputError, match="finetune.steps"):
        load_recipe(str(path), ["finetune.steps=0"])
    with pytest.raises(InputError, match="finetune.schedule"):
        load_recipe(str(path), ["finetune.schedule=linear"])
    assert not (tmp_path / "out").exists()


def test_abq_quantize_shows_the_stage_and_its_kl(tmp_path, tiny_llama, tiny_text_file, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, tiny_text_file, "w4a16", FINETUNE)
    assert abq(tmp_path, "quantize", recipe) == 0
    err = flat(capsys.readouterr().err)
    assert "method abq, finetune 8 steps, model" in err
    assert "finetune: training the scales end to end, 8 steps" in err
    log = json.loads((tmp_path / "out" / "quant_log.json").read_text())["finetune"]
    assert f"finetune: KL of the first step's windows {log['loss_first']:.5f} -> {log['loss_last']:.5f}" in err


@pytest.mark.parametrize(("last", "hint"), [(0.3, True), (0.1, False)])
def test_the_stage_line_hints_at_the_rate_only_when_the_kl_rose(last, hint):
    console = Console(record=True, width=400)
    shown = RichCalibrationProgress(RichProgress(console=console))
    shown.finetune_end(finetune.FinetuneLog(steps=4, loss_first=0.2, loss_last=last, seconds=1.0))
    line = console.export_text()
    assert f"finetune: KL of the first step's windows 0.20000 -> {last:.5f}, 1.0 s" in line
    assert ("finetune.lr may be too high" in line) is hint
