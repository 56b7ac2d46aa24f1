"""The calibration loop through the library (`abqcli.pipeline.run_quantize`): what it writes is exact.

- fold exactness: every quantized linear's saved weight is `QuantizedWeight.dequantize()` of the saved
  integer state, bit for bit (LET, compensation and LWC folded before quantization);
- W2* keeps five levels; `rtn` is plain round-to-nearest of the original weights;
- checkpoints: what an interrupted run leaves, and the guards on resuming from it.

Tiny runs only (2 blocks, 4 windows x 32 tokens, 3 epochs), one torch thread (see test_quantize_cli).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from abqcli.errors import InputError, RunError
from abqcli.formats import QUANT_STATE, RECIPE_YAML
from abqcli.formats.manifest import layer_quant_from_meta, read_manifest
from abqcli.pipeline import CHECKPOINT_DIR, run_quantize
from abqcli.quant.calibrate import Progress
from abqcli.quant.checkpoint import CHECKPOINT_STATE, BlockLog
from abqcli.quant.quantizer import QuantizedWeight, fake_quantize_weight, quantize_weight
from abqcli.recipe import load_recipe

LINEARS = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
}
PREFIX = {"llama": "model.layers", "qwen2": "model.layers", "opt": "model.decoder.layers"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_recipe(path: Path, model: Path, text: Path, out: Path, scheme: str = "w4a4", extra: str = "",
                method: str = "abq", epochs: int = 3, rounding: str | None = None):
    rounding_key = f"rounding: {rounding}, learned: {{lr: 0.1}}, " if rounding else ""
    path.write_text(
        f"model: {{path: {model}}}\n"
        f"scheme: {scheme}\n"
        f"{extra}\n"
        f"calibration: {{method: {method}, {rounding_key}dataset: {text}, nsamples: 4, seqlen: 32, "
        f"epochs: {epochs}, batch_size: 2, device: cpu}}\n"
        f"output: {{dir: {out}, formats: [hf-fakequant]}}\n"
    )
    return load_recipe(str(path))


class Runs:
    """Completed library runs, one per (model, scheme, extra, method), made on first use."""

    def __init__(self, root: Path, models: dict[str, Path], text: Path):
        self.root, self.models, self.text = root, models, text
        self.done: dict[tuple, tuple[Path, dict]] = {}

    def get(self, model: str, scheme: str = "w4a4", extra: str = "", method: str = "abq",
            rounding: str | None = None) -> tuple[Path, dict]:
        key = (model, scheme, extra, method, rounding)
        if key not in self.done:
            work = self.root / f"run{len(self.done)}"
            work.mkdir()
            recipe = make_recipe(work / "recipe.yaml", self.models[model], self.text, work / "out", scheme,
                                 extra, method, rounding=rounding)
            summary = run_quantize(recipe)
            self.done[key] = (work / "out", summary)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, tiny_text_file) -> Runs:
    return Runs(tmp_path_factory.mktemp("calib"), tiny_models, tiny_text_file)


def saved_states(fq: Path) -> dict[str, QuantizedWeight]:
    manifest = read_manifest(fq)
    tensors = load_file(str(fq / QUANT_STATE))
    return {
        name: QuantizedWeight(tensors[f"{name}.codes"], tensors[f"{name}.scales"], tensors[f"{name}.zeros"],
                              layer_quant_from_meta(meta).weight)
        for name, meta in manifest["layers"].items()
    }


# ------------------------------------------------------------------------------------------ exactness


FOLD_CASES = [
    ("llama", "w4a4", ""),
    ("opt", "w4a4", ""),  # LET with shifts (OPT W-A), biases, compensation on fc2
    ("qwen2", "w3a16", "weights: {group_size: 48}"),  # groups, partial last group (64 = 48 + 16)
    ("qwen2", "w3a16", "weights: {group_size: 48}", "abq", "gptq"),  # LET/LWC, then GPTQ rounding
    ("opt", "w4a4", "", "abq", "learned"),  # learned rounding offsets with LET shifts
    ("llama", "w4a16", "weights: {group_size: 48}", "gptq"),  # GPTQ alone
]
FOLD_IDS = ["llama-w4a4", "opt-w4a4", "qwen2-w3a16g48", "qwen2-w3a16g48-gptq-rounding", "opt-w4a4-learned",
            "llama-w4a16g48-gptq"]


@pytest.mark.parametrize("case", FOLD_CASES, ids=FOLD_IDS)
def test_saved_weights_equal_dequantized_integer_state(runs, case):
    out, _ = runs.get(*case)
    fq = out / "hf-fakequant"
    weights = load_file(str(fq / "model.safetensors"))
    states = saved_states(fq)
    model, scheme = case[:2]
    expected = {f"{PREFIX[model]}.{i}.{rel}" for i in range(2) for rel in LINEARS[model]}
    assert set(states) == expected
    for name, state in states.items():
        assert state.codes.dtype == torch.uint8
        assert int(state.codes.max()) <= state.spec.qmax
        assert torch.equal(state.zero, state.zero.round()), name
        assert state.spec.bits == int(scheme[1])
        weight = weights[f"{name}.weight"]
        assert weight.dtype == torch.float32
        assert torch.equal(weight, state.dequantize()), f"{name}: saved weight is not the folded integer state"


def test_w2_star_gives_five_levels_per_row(runs):
    out, _ = runs.get("llama", "w2*a16")
    fq = out / "hf-fakequant"
    manifest = read_manifest(fq)
    weights = load_file(str(fq / "model.safetensors"))
    most = 0
    for name, state in saved_states(fq).items():
        meta = manifest["layers"][name]
        assert meta["bits"] == 2 and meta["balance"] is True
        assert state.spec.qmax == 4
        assert int(state.codes.max()) <= 4
        per_row = max(len(torch.unique(row)) for row in state.codes)
        assert per_row <= 5, name
        assert meta["distinct_codes_max_per_row"] <= 5
        most = max(most, per_row)
        assert torch.equal(weights[f"{name}.weight"], state.dequantize())
    assert most == 5  # the fifth level is really used (plain W2 would have at most 4)


def test_rtn_is_plain_round_to_nearest_of_the_original(runs, tiny_llama):
    out, summary = runs.get("llama", "w4a4", "weights: {group_size: 48}", method="rtn")
    assert summary["method"] == "rtn"
    assert all(b["loss_first"] is None and b["loss_last"] is None for b in summary["blocks"])
    original = load_file(str(tiny_llama / "model.safetensors"))
    fq = out / "hf-fakequant"
    saved = load_file(str(fq / "model.safetensors"))
    states = saved_states(fq)
    assert len(states) == 14
    for name, tensor in saved.items():
        module = name.rsplit(".", 1)[0]
        if module in states:
            rtn = fake_quantize_weight(original[name], states[module].spec)
            assert torch.equal(tensor, rtn), f"{name} is not the RTN of the original weight"
            assert torch.equal(tensor, states[module].dequantize())
        else:  # norms, embeddings, lm_head: untouched (no LET with rtn)
            assert torch.equal(tensor, original[name]), name


def test_learned_rounding_moves_codes_by_at_most_one_step(tmp_path, tiny_llama, tiny_text_file):
    """With LET, LWC and compensation off the folded weight is the original one: learned rounding may only choose the
    other neighbour of round-to-nearest (offsets in [-1/2, 1/2]), and with a high lr it does."""
    recipe = make_recipe(tmp_path / "r.yaml", tiny_llama, tiny_text_file, tmp_path / "out", "w4a16",
                         "weights: {group_size: 48}", rounding="learned", epochs=4)
    recipe = load_recipe(str(tmp_path / "r.yaml"), ["calibration.let.enabled=false", "calibration.lwc.enabled=false",
                                                  "calibration.compensation.enabled=false"])
    run_quantize(recipe)
    original = load_file(str(tiny_llama / "model.safetensors"))
    moved = 0
    for name, state in saved_states(tmp_path / "out" / "hf-fakequant").items():
        nearest = quantize_weight(original[f"{name}.weight"], state.spec)
        assert torch.equal(state.scale, nearest.scale) and torch.equal(state.zero, nearest.zero)
        step = (state.codes.int() - nearest.codes.int()).abs()
        assert int(step.max()) <= 1, name
        moved += int(step.sum())
    assert moved > 0


def test_the_windows_of_a_step_share_one_fake_quantization_of_the_weights(tmp_path, tiny_llama, tiny_text_file,
                                                                          monkeypatch):
    """batch_size 2: every optimiser step fake-quantizes each of the block's 7 linears once, not once per
    window (the gradient stays the batch's: tests/test_distributed.py compares one process, which sums the
    windows' gradients before that backward, with two, which sum them across ranks)."""
    import abqcli.quant.methods.abq as abq_method

    calls, steps = [], []
    monkeypatch.setattr(abq_method, "fake_quantize_weight",
                        lambda *a, **k: calls.append(1) or fake_quantize_weight(*a, **k))
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    run_quantize(make_recipe(tmp_path / "r.yaml", tiny_llama, tiny_text_file, tmp_path / "out"))
    assert len(steps) == 2 * 3 * 2  # 2 blocks x 3 epochs x 2 batches of 2 windows
    assert len(calls) == len(LINEARS["llama"]) * len(steps)


def test_bf16_autocast_training_tracks_the_float32_loss(runs, monkeypatch, tmp_path, tiny_llama, tiny_text_file):
    """`calibration.autocast: bfloat16` runs the student's products in bf16 during training only: the block
    losses differ from the float32 run's (the products really ran in bf16) but stay close to them, and the
    export is still exactly its folded integer state. On a device without native bf16 the run says that
    it is slower there."""
    from abqcli import pipeline

    _, fp32 = runs.get("llama")
    make_recipe(tmp_path / "r.yaml", tiny_llama, tiny_text_file, tmp_path / "out")
    monkeypatch.setattr(pipeline, "has_native_bfloat16", lambda device: False)
    notices: list[str] = []
    summary = run_quantize(load_recipe(str(tmp_path / "r.yaml"), ["calibration.autocast=bfloat16"]),
                           notify=notices.append)
    assert notices == [("calibration.autocast bfloat16: cpu has no native bf16 products (emulated: slower than "
                        "float32 here); calibration.autocast: auto runs float32 on this machine")]
    for bf16_block, fp32_block in zip(summary["blocks"], fp32["blocks"], strict=True):
        assert bf16_block["loss_first"] != fp32_block["loss_first"]
        assert bf16_block["loss_last"] == pytest.approx(fp32_block["loss_last"], rel=0.1)
    fq = tmp_path / "out" / "hf-fakequant"
    weights = load_file(str(fq / "model.safetensors"))
    for name, state in saved_states(fq).items():
        assert torch.equal(weights[f"{name}.weight"], state.dequantize()), name


def test_bf16_passes_move_the_targets_and_keep_the_export_exact(runs, tmp_path, tiny_llama, tiny_text_file):
    """`calibration.autocast_passes: true` with a bf16 `autocast`: the passes of both chains run in bf16
    too, so the block losses (against other targets) differ from those of float32 passes but stay close,
    and the export is still exactly its folded integer state; with `autocast: none` it changes nothing."""
    _, fp32 = runs.get("llama")
    losses = {}
    for autocast in ("bfloat16", "none"):
        for passes in ("false", "true"):
            out = tmp_path / f"{autocast}-{passes}"
            make_recipe(tmp_path / "r.yaml", tiny_llama, tiny_text_file, out)
            recipe = load_recipe(str(tmp_path / "r.yaml"), [f"calibration.autocast={autocast}",
                                                            f"calibration.autocast_passes={passes}"])
            losses[autocast, passes] = [b["loss_last"] for b in run_quantize(recipe)["blocks"]]
            weights = load_file(str(out / "hf-fakequant" / "model.safetensors"))
            for name, state in saved_states(out / "hf-fakequant").items():
                assert torch.equal(weights[f"{name}.weight"], state.dequantize()), name
    assert losses["none", "true"] == losses["none", "false"] == [b["loss_last"] for b in fp32["blocks"]]
    assert losses["bfloat16", "true"] != losses["bfloat16", "false"]
    assert losses["bfloat16", "true"] == pytest.approx(losses["bfloat16", "false"], rel=0.1)


def test_autocast_auto_resolves_per_device_and_is_recorded(runs, monkeypatch, tmp_path, tiny_llama, tiny_text_file):
    """`calibration.autocast: auto` is bfloat16 for a method that trains on a device with native bf16
    products, none otherwise; the run records the resolved value, and on a device without native bf16
    it is exactly the float32 run."""
    import abqcli.recipe_checks as checks

    make_recipe(tmp_path / "r.yaml", tiny_llama, tiny_text_file, tmp_path / "out")
    auto = load_recipe(str(tmp_path / "r.yaml"), ["calibration.autocast=auto"])
    for native, method, expected in [(True, "abq", "bfloat16"), (False, "abq", "none"), (True, "gptq", "none")]:
        monkeypatch.setattr(checks, "has_native_bfloat16", lambda device, native=native: native)
        recipe = load_recipe(str(tmp_path / "r.yaml"), ["calibration.autocast=auto", f"calibration.method={method}"])
        assert checks.resolve_autocast(recipe, "cpu").calibration.autocast == expected
    monkeypatch.setattr(checks, "has_native_bfloat16", lambda device: False)
    summary = run_quantize(auto)
    assert yaml.safe_load((tmp_path / "out" / RECIPE_YAML).read_text())["calibration"]["autocast"] == "none"
    _, fp32 = runs.get("llama")
    assert [b["loss_last"] for b in summary["blocks"]] == [b["loss_last"] for b in fp32["blocks"]]


def test_an_unresolved_autocast_auto_follows_the_device(monkeypatch, tmp_path, tiny_llama, tiny_text_file):
    """A caller of the loop who did not resolve `auto` (the run does: `resolve_autocast`) gets the same
    rule in the method: bf16 training passes exactly where the device has native bf16."""
    from types import SimpleNamespace

    import abqcli.recipe_checks as checks
    from abqcli.models.adapters import LlamaAdapter
    from abqcli.quant.methods.abq import AbqMethod

    make_recipe(tmp_path / "r.yaml", tiny_llama, tiny_text_file, tmp_path / "out")
    method = AbqMethod(load_recipe(str(tmp_path / "r.yaml"), ["calibration.autocast=auto"]), LlamaAdapter())
    for native in (True, False):
        monkeypatch.setattr(checks, "has_native_bfloat16", lambda device, native=native: native)
        with method._autocast(SimpleNamespace(device=torch.device("cpu"))):
            assert torch.is_autocast_enabled("cpu") == native


def test_a_rounding_the_method_cannot_run_is_refused_before_loading(tmp_path, tiny_llama, tiny_text_file):
    for method, rounding, advice in [("rtn", "gptq", "method: abq or gptq"), ("gptq", "learned", "method: abq"),
                                     ("gptq", "nearest", "method: abq or rtn")]:
        recipe = make_recipe(tmp_path / "r.yaml", tiny_llama, tiny_text_file, tmp_path / "out", method=method,
                             rounding=rounding)
        with pytest.raises(InputError, match=f"calibration.rounding: method {method} .* not {rounding}.*{advice}"):
            run_quantize(recipe)
        assert not (tmp_path / "out").exists()


def test_autocast_for_a_method_that_does_not_train_is_refused_before_loading(tmp_path, tiny_llama, tiny_text_file):
    for method in ("gptq", "rtn"):
        make_recipe(tmp_path / "r.yaml", tiny_llama, tiny_text_file, tmp_path / "out", method=method)
        recipe = load_recipe(str(tmp_path / "r.yaml"), ["calibration.autocast=bfloat16"])
        with pytest.raises(InputError, match=f"calibration.autocast bfloat16: method {method} does not train.*"
                                             "method: abq"):
            run_quantize(recipe)
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the log


def test_quant_log_and_cleanup(runs):
    out, summary = runs.get("llama")
    assert not (out / CHECKPOINT_DIR).exists()
    log = json.loads((out / "quant_log.json").read_text())
    assert log == json.loads(json.dumps(summary))
    assert log["scheme"] == "W4A4 (kv A4)"
    assert log["outputs"] == {"hf-fakequant": str(out / "hf-fakequant")}
    assert len(log["provenance"]["fingerprint"]) == 64
    for i, block in enumerate(log["blocks"]):
        assert block["block"] == i
        assert block["seconds"] >= 0 and block["peak_memory_mb"] > 0
        assert block["loss_first"] > 0 and block["loss_last"] > 0
    manifest = read_manifest(out / "hf-fakequant")
    assert manifest["kv_bits"] == 4
    assert manifest["provenance"]["fingerprint"] == log["provenance"]["fingerprint"]


# ------------------------------------------------------------------------------------------ checkpoints


class StopAfter(Progress):
    """Raises KeyboardInterrupt once block `block` is checkpointed; records what it saw."""

    def __init__(self, block: int | None):
        self.block, self.ended, self.started = block, [], []

    def block_start(self, block, num_blocks, steps):
        self.started.append((block, num_blocks, steps))

    def block_end(self, log: BlockLog) -> None:
        self.ended.append(log.block)
        if log.block == self.block:
            raise KeyboardInterrupt


@pytest.fixture
def interrupted(tmp_path, tiny_llama, tiny_text_file):
    """A run stopped after block 0: (recipe, output dir)."""
    recipe = make_recipe(tmp_path / "recipe.yaml", tiny_llama, tiny_text_file, tmp_path / "out")
    progress = StopAfter(0)
    with pytest.raises(KeyboardInterrupt):
        run_quantize(recipe, progress=progress)
    assert progress.ended == [0]
    assert progress.started == [(0, 2, 3 * 2)]  # 3 epochs x 2 batches of 2 windows
    return recipe, tmp_path / "out"


def test_interrupted_run_leaves_one_block_checkpointed(interrupted):
    _, out = interrupted
    ckpt = out / CHECKPOINT_DIR
    assert sorted(p.name for p in ckpt.iterdir()) == ["block_0000.safetensors", CHECKPOINT_STATE]
    state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    assert len(state["done"]) == 1 and set(state["done"][0]) == {"fp", "q"}
    assert [entry["block"] for entry in state["log"]] == [0]
    tensors = load_file(str(ckpt / "block_0000.safetensors"))
    assert "codes.self_attn.q_proj" in tensors and "param.input_layernorm.weight" in tensors
    assert not (out / "hf-fakequant").exists() and not (out / "quant_log.json").exists()


def test_resume_continues_at_the_next_block(interrupted):
    recipe, out = interrupted
    checkpoint_log = json.loads((out / CHECKPOINT_DIR / CHECKPOINT_STATE).read_text())["log"]
    progress = StopAfter(None)
    summary = run_quantize(recipe, resume=True, progress=progress)
    assert progress.ended == [1] and [s[0] for s in progress.started] == [1]
    assert summary["blocks"][0] == checkpoint_log[0]
    assert not (out / CHECKPOINT_DIR).exists()
    fq = out / "hf-fakequant"
    weights = load_file(str(fq / "model.safetensors"))
    for name, state in saved_states(fq).items():
        assert torch.equal(weights[f"{name}.weight"], state.dequantize())


def test_resume_refuses_a_checkpoint_whose_outputs_do_not_reproduce(interrupted):
    recipe, out = interrupted
    path = out / CHECKPOINT_DIR / CHECKPOINT_STATE
    state = json.loads(path.read_text())
    state["done"][0]["q"] = "0" * 64
    path.write_text(json.dumps(state))
    with pytest.raises(RunError, match="block 0 reproduces different outputs"):
        run_quantize(recipe, resume=True)


def test_resume_refuses_another_fingerprint(interrupted, tiny_llama, tiny_text_file):
    recipe, out = interrupted
    path = out / CHECKPOINT_DIR / CHECKPOINT_STATE
    before = path.read_bytes()
    changed = make_recipe(out.parent / "changed.yaml", tiny_llama, tiny_text_file, out, epochs=4)
    with pytest.raises(InputError, match="different model, recipe or calibration data"):
        run_quantize(changed, resume=True)
    assert path.read_bytes() == before
    # the output dir and eval settings are not part of the fingerprint
    moved = out.parent / "moved"
    out.rename(moved)
    same = make_recipe(out.parent / "same.yaml", tiny_llama, tiny_text_file, moved)
    assert same.calibration == recipe.calibration
    summary = run_quantize(same, resume=True)
    assert [b["block"] for b in summary["blocks"]] == [0, 1]


def test_fresh_run_over_a_checkpoint_needs_overwrite_and_then_starts_again(interrupted):
    recipe, out = interrupted
    with pytest.raises(InputError, match="output directory exists"):
        run_quantize(recipe)
    progress = StopAfter(None)
    run_quantize(recipe, overwrite=True, progress=progress)
    assert progress.ended == [0, 1]
    assert not (out / CHECKPOINT_DIR).exists()
