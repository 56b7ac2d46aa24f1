"""Hostile inputs through the CLI: every one is exit 2 with one `error:` line, checked before the model
loads, and leaves the disk as it was; plus the progress lines of eval / verify / quantize off a terminal.

Each case asserts the exit code, the one error line (no traceback) and, where it could write files, that
the working directory (recipe, decoy files) is byte for byte the same afterwards.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from abqcli.models import loading
from abqcli.quant import calibrate
from abqcli.quant.methods import abq as abq_method
from test_quantize_cli import abq, error_line, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = ("--seqlen", "32", "--limit", "3", "--device", "cpu")


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory` (hidden ones too): file bytes, None for a directory."""
    return {str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
            for p in sorted(directory.rglob("*"))}


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A working directory holding a decoy folder of user files."""
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "notes.txt").write_text("the user's notes\n")
    (decoy / "weights.bin").write_bytes(bytes(range(256)))
    return tmp_path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model is loaded (the error must come before)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(loading, "load_model", refuse)


def refused(workdir: Path, capsys, *args) -> str:
    """Run `abq ARGS` in `workdir`; assert exit 2, one error line and nothing changed on disk."""
    before = tree(workdir)
    capsys.readouterr()
    rc = abq(workdir, *args)
    line = error_line(capsys.readouterr().err)
    assert rc == 2, line
    assert tree(workdir) == before
    return line


# ------------------------------------------------------------------------------------------ devices


def missing_devices() -> list[str]:
    """Device strings no machine here has: malformed ones, a CUDA index past the visible count, and
    plain `cuda` where there is no GPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["tpu", "cuda:x", "gpu", f"cuda:{count}", "cuda:7" if count < 8 else "cuda:99",
            *([] if count else ["cuda"])]


@pytest.mark.parametrize("device", missing_devices())
def test_eval_refuses_a_missing_device_before_loading(device, workdir, tiny_llama, tiny_text_file, capsys,
                                                      no_model_load):
    line = refused(workdir, capsys, "eval", "--model", tiny_llama, "--dataset", tiny_text_file,
                   "--device", device)
    assert "--device" in line and device in line


@pytest.mark.parametrize("device", ["cuda:7", "tpu"])
def test_quantize_refuses_a_missing_calibration_device_before_loading(device, workdir, tiny_llama, tiny_text_file,
                                                                      capsys, no_model_load):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    recipe = write_recipe(workdir, tiny_llama, tiny_text_file)
    line = refused(workdir, capsys, "quantize", recipe, "--set", f"calibration.device={device}",
                   "--output", "new/out")  # not even the output's parent is made
    assert "calibration.device" in line and device in line


# ------------------------------------------------------------------------------------------ --json


def json_cases(workdir: Path) -> dict[str, Path]:
    (workdir / "a_file").write_text("x")
    cases = {"a directory": workdir / "decoy", "under a file": workdir / "a_file" / "r.json"}
    if Path("/sys").is_dir():  # not writable even for root
        cases["read-only"] = Path("/sys/abq-result.json")
    return cases


@pytest.mark.parametrize("command", ["eval", "quantize", "verify", "inspect"])
def test_unwritable_json_path_is_refused_before_any_work(command, workdir, tiny_llama, tiny_text_file, capsys,
                                                         monkeypatch, no_model_load):
    from abqcli import verify

    for name in ("verify_export", "inspect_export"):
        monkeypatch.setattr(verify, name, lambda *a, **k: pytest.fail("the export was opened"))
    recipe = write_recipe(workdir, tiny_llama, tiny_text_file)
    args = {"eval": ["eval", "--model", tiny_llama, "--dataset", tiny_text_file, *EVAL],
            "quantize": ["quantize", recipe], "verify": ["verify", tiny_llama], "inspect": ["inspect", tiny_llama]}
    for why, path in json_cases(workdir).items():
        line = refused(workdir, capsys, *args[command], "--json", path)
        assert line.startswith(f"error: --json {path}"), (why, line)


def test_json_in_missing_folders_is_created(workdir, tiny_llama, tiny_text_file, capsys):
    target = workdir / "new" / "deeper" / "ppl.json"
    rc = abq(workdir, "eval", "--model", tiny_llama, "--dataset", tiny_text_file, *EVAL, "--json", target)
    assert rc == 0, capsys.readouterr().err
    assert '"ppl"' in target.read_text()


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("extra, expected", [
    ("nsamples: 1e23", "calibration.nsamples: expected a positive integer, got 1e+23"),
    ("nsamples: 100000000000000000000000",
     "calibration.nsamples: expected a positive integer up to 1000000, got 100000000000000000000000"),
    ("seqlen: 1.0", "calibration.seqlen: expected a positive integer, got 1.0"),
    ("epochs: 1000000", "calibration.epochs: expected a positive integer up to 10000, got 1000000"),
])
def test_absurd_recipe_sizes_are_refused_before_loading(extra, expected, workdir, tiny_llama, tiny_text_file,
                                                        capsys, no_model_load):
    recipe = write_recipe(workdir, tiny_llama, tiny_text_file)
    text = recipe.read_text().replace("  nsamples: 4\n", "").replace("  seqlen: 32\n", "")
    recipe.write_text(text.replace("  epochs: 5\n", "").replace("calibration:\n", f"calibration:\n  {extra}\n"))
    assert expected in refused(workdir, capsys, "quantize", recipe)


def alias_bomb(levels: int) -> str:
    """~50 bytes per level: level i is a list of 9 references to level i - 1, so the last one stands for
    9^(levels + 1) scalars. levels=8 took 98 s and 3.3 GB before its error; this is under a real key."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return f"ignore: [[{', '.join(anchors)}], *a{levels}]\n"


def test_yaml_alias_bomb_is_refused_at_once(workdir, capsys, no_model_load):
    bomb = workdir / "bomb.yaml"
    bomb.write_text(alias_bomb(9))
    assert len(bomb.read_text()) < 1024
    start = time.perf_counter()
    line = refused(workdir, capsys, "quantize", bomb)
    assert time.perf_counter() - start < 2.0
    assert "expands to more than 100000 values" in line and len(line) < 300


def test_yaml_alias_bomb_in_a_set_value_is_refused_at_once(workdir, capsys, no_model_load):
    value = alias_bomb(9).removeprefix("ignore: ").strip()
    start = time.perf_counter()
    line = refused(workdir, capsys, "eval", "--scheme", "w4a16", "--set", f"ignore={value}")
    assert time.perf_counter() - start < 2.0
    assert "--set" in line and "expands to more than" in line and len(line) < 300


@pytest.mark.parametrize("value", [
    "[[" + ", ".join(["x"] * 20_000) + "]]",  # a long list as ignore.0
    "['" + "y" * 1_000_000 + "', 3]",  # a huge string, then a bad item
])
def test_huge_values_are_shown_short(value, workdir, capsys, no_model_load):
    recipe = workdir / "huge.yaml"
    recipe.write_text(f"scheme: w4a16\nignore: {value}\n")
    line = refused(workdir, capsys, "quantize", recipe)
    assert "ignore." in line and len(line) < 300


def test_huge_unknown_key_is_shown_short(workdir, capsys, no_model_load):
    recipe = workdir / "key.yaml"
    recipe.write_text(f"scheme: w4a16\ncalibration:\n  ? {'nsample' * 100_000}\n  : 3\n")  # explicit key
    line = refused(workdir, capsys, "quantize", recipe)
    assert "unknown key" in line and len(line) < 400


# ------------------------------------------------------------------------------ the recipe fits the model


def test_ignoring_every_linear_is_refused_by_quantize_and_eval(workdir, tiny_llama, tiny_text_file, capsys,
                                                               monkeypatch):
    recipe = write_recipe(workdir, tiny_llama, tiny_text_file, extra="ignore: ['*']")
    monkeypatch.setattr(calibrate.Calibrator, "run", lambda *a, **k: pytest.fail("calibration started"))
    quantize = refused(workdir, capsys, "quantize", recipe)
    assert "leaves none of the 14 linear layers" in quantize
    assert refused(workdir, capsys, "eval", "--model", tiny_llama, "--dataset", tiny_text_file, *EVAL,
                   "--recipe", recipe) == quantize
    assert refused(workdir, capsys, "eval", "--model", tiny_llama, "--dataset", tiny_text_file, *EVAL,
                   "--scheme", "w4a16", "--set", "ignore=[model.layers.*]") == quantize.replace("'*'",
                                                                                              "'model.layers.*'")


def test_eval_refuses_a_group_size_larger_than_a_layer_as_quantize_does(workdir, tiny_llama, tiny_text_file,
                                                                        capsys):
    recipe = write_recipe(workdir, tiny_llama, tiny_text_file, scheme="w4a16")
    quantize = refused(workdir, capsys, "quantize", recipe, "--set", "weights.group_size=100000")
    assert "weights.group_size 100000 is larger than the input size" in quantize
    evaluated = refused(workdir, capsys, "eval", "--model", tiny_llama, "--dataset", tiny_text_file, *EVAL,
                        "--scheme", "w4a16", "--group-size", "100000")
    assert evaluated == quantize


def test_eval_still_accepts_group_sizes_only_the_packed_format_refuses(workdir, tiny_llama, tiny_text_file,
                                                                       capsys):
    rc = abq(workdir, "eval", "--model", tiny_llama, "--dataset", tiny_text_file, *EVAL, "--scheme", "w4a8",
             "--group-size", "32")
    assert rc == 0, capsys.readouterr().err


def test_eval_refuses_an_override_that_matches_nothing_as_quantize_does(workdir, tiny_llama, tiny_text_file,
                                                                        capsys):
    extra = "overrides: {'*.dense_4h_to_h': {weights: {bits: 8}}}"
    recipe = write_recipe(workdir, tiny_llama, tiny_text_file, extra=extra)
    quantize = refused(workdir, capsys, "quantize", recipe)
    assert "overrides.'*.dense_4h_to_h': matches no linear layer" in quantize
    assert refused(workdir, capsys, "eval", "--model", tiny_llama, "--dataset", tiny_text_file, *EVAL,
                   "--recipe", recipe) == quantize


# ------------------------------------------------------------------------------ non-finite loss


def test_nan_loss_at_the_first_block_gives_advice_that_works(workdir, tiny_llama, tiny_text_file, capsys,
                                                              monkeypatch):
    recipe = write_recipe(workdir, tiny_llama, tiny_text_file, batch_size=2)
    real, calls = abq_method.batch_means, itertools.count()

    def nan_means(*args, **kwargs):  # one call per step
        means = real(*args, **kwargs)
        return dict.fromkeys(means, float("nan")) if next(calls) == 2 else means

    with monkeypatch.context() as patch:
        patch.setattr(abq_method, "batch_means", nan_means)
        capsys.readouterr()
        rc = abq(workdir, "quantize", recipe)
    line = error_line(capsys.readouterr().err)
    assert rc == 1
    assert "non-finite loss at block 0, epoch 1, step 0" in line and "block 1/2 in the progress" in line
    assert "no block is checkpointed yet" in line and "0..-1" not in line
    assert "--set calibration.lwc.lr=1e-3" in line and "start again with --overwrite" in line
    # the advice works: the lowered learning rate with --overwrite runs (a --resume would be refused)
    rc = abq(workdir, "quantize", recipe, "--set", "calibration.lwc.lr=1e-3", "--overwrite")
    assert rc == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------ progress


def test_eval_prints_plain_progress_lines(workdir, tiny_llama, tiny_text_file, capsys):
    rc = abq(workdir, "eval", "--model", tiny_llama, "--dataset", tiny_text_file, *EVAL, "--scheme", "w4a16")
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = err.splitlines()
    loaded = f"loaded {tiny_llama} (fake-quant RTN W4A16): scoring 3 windows of 32 tokens"
    windows = [i for i, line in enumerate(lines) if line.startswith("window ")]
    assert [lines[i].split(":")[0] for i in windows] == ["window 1/3", "window 2/3", "window 3/3"]
    assert lines.index(loaded) < windows[0]
    assert lines[windows[-1]].startswith("window 3/3: ppl ")


def test_verify_prints_its_phases(workdir, tiny_llama, capsys, no_data_dir_env):
    from test_export_packed import SCHEMES, export_packed

    export_packed(tiny_llama, workdir / "packed", SCHEMES["w4a4"][0], 4)
    capsys.readouterr()
    rc = abq(workdir, "verify", workdir / "packed", "--seqlen", "32", "--windows", "2")
    err = capsys.readouterr().err
    assert rc == 0, err
    phases = [line.split(" ")[0] + " " + line.split(" ")[1] for line in err.splitlines()
              if line.startswith(("loaded ", "window ", "checking "))]
    assert phases == ["loaded " + str(workdir / "packed"), "window 1/2:", "window 2/2:", "checking 14"]


def test_quantize_numbers_blocks_from_one_out_of_n(workdir, tiny_llama, tiny_text_file, capsys):
    recipe = write_recipe(workdir, tiny_llama, tiny_text_file)
    capsys.readouterr()
    assert abq(workdir, "quantize", recipe, "--set", "calibration.method=rtn") == 0
    blocks = [line for line in capsys.readouterr().err.splitlines() if line.startswith("block ")]
    assert [line.split(":")[0] for line in blocks] == ["block 1/2", "block 1/2", "block 2/2", "block 2/2"]
    assert blocks[0] == "block 1/2: rounding" and blocks[1].startswith("block 1/2: rounded, ")
