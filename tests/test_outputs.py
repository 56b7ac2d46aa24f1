"""Output directories are never destroyed or shared (issue 9): what `--overwrite` may replace, the
swap that keeps the previous output until the new one is complete, kill -9 at any moment, the lock,
writability checked before the model loads, and `--resume` on every state an output can be in.

Hostile cases assert the exit code, the one `error:` line and that nothing on disk changed (a snapshot
of every path under the test's directory before and after). Runs use the tiny llama of conftest.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from abqcli import outputs
from abqcli.formats.hf_fakequant import HF_FAKEQUANT
from abqcli.formats.manifest import read_manifest
from abqcli.models import loading
from abqcli.quant.methods import abq as abq_method
from test_quantize_cli import (
    abq,
    checkpoint_blocks,
    dir_bytes,
    error_line,
    flat,
    interrupt_after_block,
    write_recipe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ABQ_SCRIPT = Path(sys.executable).with_name("abq")  # the console script of this environment


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root`: file contents, None for a directory."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def siblings(out: Path) -> list[str]:
    """The temporary, old and lock siblings of an output directory."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_complete(out: Path) -> str:
    """`out` holds one whole abq quantize output (one run's recipe throughout); returns its recipe."""
    recipe = (out / "recipe.yaml").read_text()
    assert (out / "quant_log.json").is_file() and (out / outputs.MARKER).is_file()
    assert read_manifest(out / "hf-fakequant", verify=True)["format"] == "hf-fakequant"
    assert (out / "hf-fakequant" / "recipe.yaml").read_text() == recipe
    return recipe


def seed_of(recipe_yaml: str) -> int:
    return int(re.search(r"^  seed: (\d+)$", recipe_yaml, re.MULTILINE).group(1))


def no_model_load(monkeypatch) -> None:
    """Fail the command (exit 1, not 2) if it gets as far as loading the model."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", load_model)


@pytest.fixture(scope="module")
def previous(tmp_path_factory, tiny_llama, tiny_text_file) -> Path:
    """A complete `abq quantize` output (the default seed), to copy where a test needs a previous output."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("previous")
    assert abq(work, "quantize", write_recipe(work, tiny_llama, tiny_text_file)) == 0
    torch.set_num_threads(threads)
    return work / "out"


@pytest.fixture
def work(tmp_path, tiny_llama, tiny_text_file, previous) -> Path:
    """tmp_path/work with recipe.yaml (model tmp_path/models/tiny, a copy) and out/ = a previous output."""
    model = shutil.copytree(tiny_llama, tmp_path / "models" / "tiny")
    work = tmp_path / "work"
    write_recipe(work, model, tiny_text_file)
    shutil.copytree(previous, work / "out")
    return work


# ------------------------------------------------------------------------------------------ refusals


def _refusal_layout(tmp_path: Path) -> None:
    notes = tmp_path / "work" / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep me")
    (notes / "b.txt").write_text("and me")
    (tmp_path / "work" / "deep" / "er").mkdir(parents=True)


# (case, cwd relative to tmp_path, --output relative to cwd, what the error line says)
REFUSALS = [
    ("unrelated-files", "work", "notes", "is not an abq output (it holds a.txt, b.txt)"),
    ("the-model-dir", "work", "../models/tiny", "is the model"),
    ("contains-the-model", "work", "../models", "contains the model"),
    ("inside-the-model", "work", "../models/tiny/sub", "lies inside the model"),
    ("cwd", "work", ".", "is the current directory or one of its ancestors"),
    ("ancestor-of-cwd", "work/deep/er", "../..", "is the current directory or one of its ancestors"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_overwrite_refuses_what_is_not_an_abq_output(work, case, capsys):
    _, cwd, output, expected = case
    root = work.parent
    _refusal_layout(root)
    before = snapshot(root)
    rc = abq(root / cwd, "quantize", work / "recipe.yaml", "--output", output, "--overwrite")
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert expected in line
    assert snapshot(root) == before


PACK_REFUSALS = [
    ("parent-of-source", "out", "contains the pack source"),
    ("the-source", "out/hf-fakequant", "is the pack source"),
    ("inside-the-source", "out/hf-fakequant/packed", "lies inside the pack source"),
    ("cwd", ".", "is the current directory"),
]


@pytest.mark.parametrize("case", PACK_REFUSALS, ids=[c[0] for c in PACK_REFUSALS])
def test_pack_refuses_to_write_over_its_source(work, case, capsys):
    _, output, expected = case
    before = snapshot(work.parent)
    rc = abq(work, "pack", "out/hf-fakequant", "--output", output, "--overwrite")
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert expected in line
    assert snapshot(work.parent) == before


def test_pack_overwrite_replaces_only_an_abq_export(work, capsys):
    (work / "packed").mkdir()
    (work / "packed" / "mine.txt").write_text("not abq's")
    before = snapshot(work.parent)
    rc = abq(work, "pack", "out/hf-fakequant", "--output", "packed", "--overwrite")
    assert rc == 2
    assert "is not an abq output (it holds mine.txt)" in error_line(capsys.readouterr().err)
    assert snapshot(work.parent) == before


def test_empty_output_option_is_refused(work, capsys):
    before = snapshot(work.parent)
    rc = abq(work, "quantize", "recipe.yaml", "--output", "", "--overwrite")
    assert rc == 2
    assert "--output is empty" in error_line(capsys.readouterr().err)
    assert snapshot(work.parent) == before


# ------------------------------------------------------------------------------------------ replacing


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_a_previous_abq_output(work, exchange, monkeypatch, capsys):
    if not exchange:
        monkeypatch.setattr(outputs, "_renameat2", lambda: None)
    out = work / "out"
    assert seed_of(assert_complete(out)) != 5
    rc = abq(work, "quantize", "recipe.yaml", "--overwrite", "--set", "calibration.seed=5")
    assert rc == 0, capsys.readouterr().err
    assert seed_of(assert_complete(out)) == 5
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, "hf-fakequant", "quant_log.json",
                                                     "recipe.yaml"]
    assert siblings(out) == []  # no temporary, old or lock sibling left


@pytest.mark.parametrize("leave", [["recipe.yaml", "quant_log.json", "hf-fakequant"], ["recipe.yaml"]],
                         ids=["pre-marker-output", "only-a-recipe"])
def test_an_output_without_the_marker(work, leave, capsys):
    """Chosen: an output of an abq from before the marker is replaced when it holds nothing but abq's own
    names and has a quant_log.json (or a checkpoint state); a lone recipe.yaml may be the user's own."""
    out = work / "out"
    (out / outputs.MARKER).unlink()
    for path in out.iterdir():
        if path.name in leave:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    before = snapshot(work.parent)
    rc = abq(work, "quantize", "recipe.yaml", "--overwrite")
    err = capsys.readouterr().err
    if "quant_log.json" in leave:
        assert rc == 0, err
        assert_complete(out)
    else:
        assert rc == 2
        assert "is not an abq output (it holds recipe.yaml)" in error_line(err)
        assert snapshot(work.parent) == before


def test_overwrite_with_a_bad_recipe_touches_nothing(work, capsys):
    before = snapshot(work.parent)
    rc = abq(work, "quantize", "recipe.yaml", "--overwrite", "--set", "scheme=w4a16",
             "--set", "weights.group_size=256")
    assert rc == 2
    assert "is larger than the input size" in error_line(capsys.readouterr().err)
    assert snapshot(work.parent) == before


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert outputs._exchange(a, b), "renameat2(RENAME_EXCHANGE) should work on this Linux filesystem"
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def _interrupt_in_export(monkeypatch) -> None:
    """Ctrl-C once the hf-fakequant export has been written into the staging directory."""
    real = HF_FAKEQUANT.write

    def write_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(HF_FAKEQUANT, "write", write_then_interrupt)


@pytest.mark.parametrize("moment", ["after-block-0", "in-export"])
def test_ctrl_c_during_overwrite_keeps_the_previous_output(work, moment, monkeypatch, capsys):
    out = work / "out"
    before, seed_before = dir_bytes(out), seed_of(assert_complete(out))
    with monkeypatch.context() as patch:
        if moment == "in-export":
            _interrupt_in_export(patch)
        else:
            interrupt_after_block(patch, 0)
        rc = abq(work, "quantize", "recipe.yaml", "--overwrite", "--set", "calibration.seed=5")
    err = flat(capsys.readouterr().err)
    assert rc == 130
    blocks = 2 if moment == "in-export" else 1
    assert f"{blocks} completed block(s) are checkpointed" in err and "rerun with --resume" in err
    # the previous output is intact and complete; only the new run's checkpoint was added beside it
    assert seed_of(assert_complete(out)) == seed_before != 5
    assert {k: v for k, v in dir_bytes(out).items() if not k.startswith("checkpoint/")} == before
    assert checkpoint_blocks(out) == blocks
    assert siblings(out) == []
    # the interrupted --overwrite run resumes into a complete new output
    rc = abq(work, "quantize", "recipe.yaml", "--resume", "--set", "calibration.seed=5")
    assert rc == 0, capsys.readouterr().err
    assert seed_of(assert_complete(out)) == 5
    assert not (out / "checkpoint").exists()


def _start_abq(workdir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([str(ABQ_SCRIPT), *args], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


BLOCK_DONE = re.compile(r"^block \S+: (loss|rtn)")


def _blocks_reported(proc: subprocess.Popen, blocks: int) -> Callable[[], bool]:
    """A kill trigger: `proc` reported `blocks` calibrated blocks on stderr (reads its progress lines)."""
    seen = [0]

    def reached() -> bool:
        while seen[0] < blocks:
            line = proc.stderr.readline()
            if not line:  # it exited
                return True
            seen[0] += bool(BLOCK_DONE.match(line))
        return True

    return reached


def _staged(work: Path, proc: subprocess.Popen, name: str = "") -> Callable[[], bool]:
    """A kill trigger: `proc`'s staging directory `.out.tmp<pid>` (or `name` inside it) exists."""
    return lambda: (work / f".out.tmp{proc.pid}" / name).exists()


def _kill_when(proc: subprocess.Popen, trigger: Callable[[], bool], delay: float) -> None:
    """SIGKILL `proc` `delay` seconds after `trigger()` holds (polled every 2 ms), or once it exited."""
    while proc.poll() is None and not trigger():
        time.sleep(0.002)
    time.sleep(delay)
    proc.kill()
    proc.communicate()


def test_kill_9_at_any_moment_of_an_overwrite_run_leaves_a_complete_output(work):
    out = work / "out"
    current = seed_of(assert_complete(out))
    # kill points: during the start (imports, model load), after the first block, once the export has
    # begun in the staging directory, once its format folder is in place there, and once quant_log.json
    # (the last file before the swap) is written: then the swap or the removal of the previous tree
    points = [
        lambda work, proc: (lambda: True, 1.5),
        lambda work, proc: (_blocks_reported(proc, 1), 0.0),
        lambda work, proc: (_staged(work, proc), 0.0),
        lambda work, proc: (_staged(work, proc), 0.03),
        lambda work, proc: (_staged(work, proc, "hf-fakequant"), 0.0),
        lambda work, proc: (_staged(work, proc, "quant_log.json"), 0.0),
    ]
    for seed, point in enumerate(points, start=current + 1):
        proc = _start_abq(work, "quantize", "recipe.yaml", "--overwrite", "--set", f"calibration.seed={seed}")
        _kill_when(proc, *point(work, proc))
        found = seed_of(assert_complete(out))  # the previous complete output, or the new complete one
        assert found in (current, seed)
        current = found
    assert abq(work, "quantize", "recipe.yaml", "--overwrite", "--set", "calibration.seed=99") == 0
    assert seed_of(assert_complete(out)) == 99
    assert siblings(out) == []  # every killed run's temporary directory is gone


def test_stale_temporary_siblings_are_removed_by_the_next_run(work, capsys):
    out = work / "out"
    for leftover in (".out.tmp99999999", ".out.old99999999"):  # left by kill -9'd runs (no such pid)
        shutil.copytree(out / "hf-fakequant", work / leftover)
    unrelated = work / ".out.tmpnotapid"
    unrelated.mkdir()
    rc = abq(work, "quantize", "recipe.yaml", "--overwrite")
    assert rc == 0, capsys.readouterr().err
    assert siblings(out) == [".out.tmpnotapid"]


def test_remove_stale_keeps_live_runs_and_restores_a_cut_fallback_swap(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp{os.getpid()}"
    live.mkdir()
    old = tmp_path / ".out.old99999999"  # the previous output, moved aside by a swap that was then killed
    old.mkdir()
    (old / "kept").write_text("previous")
    (tmp_path / ".out.tmp99999999").mkdir()  # the new one it was about to put in place
    outputs.remove_stale(out)
    assert (out / "kept").read_text() == "previous"
    assert siblings(out) == [live.name]


# ------------------------------------------------------------------------------------------ the lock


@pytest.mark.parametrize("command", ["quantize", "pack"])
def test_a_second_run_into_a_locked_output_is_refused(work, command, monkeypatch, capsys):
    target = work / ("out" if command == "quantize" else "packed")
    args = (["quantize", "recipe.yaml", "--overwrite"] if command == "quantize"
            else ["pack", "out/hf-fakequant", "--output", "packed"])
    no_model_load(monkeypatch)
    before = snapshot(work.parent)
    with outputs.output_lock(target.resolve()):
        lock = (work / f".{target.name}.lock").read_text().strip()
        rc = abq(work, *args)
        line = error_line(capsys.readouterr().err)
    assert lock == str(os.getpid())
    assert rc == 2
    assert f"another abq run (pid {os.getpid()}) is writing" in line
    assert snapshot(work.parent) == before  # the lock file is gone again too


def test_a_dead_runs_lock_is_taken_over(work, capsys):
    lock = work / ".out.lock"
    lock.write_text("99999999\n")  # a kill -9'd run: its file stays, the kernel dropped its flock
    rc = abq(work, "quantize", "recipe.yaml", "--overwrite")
    assert rc == 0, capsys.readouterr().err
    assert not lock.exists()


# ------------------------------------------------------------------------------------------ writability


@pytest.mark.parametrize("where", ["parent", "lock"])
def test_unwritable_output_is_refused_before_the_model_loads(work, where, monkeypatch, capsys):
    """Tests run as root, where chmod does not stop writes, and no read-only mount is available: the
    filesystem's refusal (EROFS) is injected at the parent's mkdir or at the lock file's creation."""
    real_mkdir, real_open = Path.mkdir, os.open
    readonly = work / "ro"

    def mkdir(self, *args, **kwargs):
        if self == readonly or readonly in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    def open_(path, *args, **kwargs):
        if str(path).endswith(".out.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    no_model_load(monkeypatch)
    if where == "parent":
        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        monkeypatch.setattr(os, "open", open_)
    output = "ro/deep/out" if where == "parent" else "out"
    before = snapshot(work.parent)
    rc = abq(work, "quantize", "recipe.yaml", "--output", output, "--overwrite")
    line = error_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert rc == 2
    assert "cannot write the output" in line and "Read-only file system" in line
    assert snapshot(work.parent) == before


# ------------------------------------------------------------------------------------------ resume


def test_ctrl_c_during_model_load_does_not_claim_checkpointed_blocks(work, monkeypatch, capsys):
    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    shutil.rmtree(work / "out")
    monkeypatch.setattr(loading, "load_model", interrupted_load)
    rc = abq(work, "quantize", "recipe.yaml")
    err = flat(capsys.readouterr().err)
    assert rc == 130
    assert "before any block was checkpointed" in err
    assert "checkpointed in" not in err and "rerun with --resume" not in err
    assert not (work / "out").exists() and siblings(work / "out") == []


def test_resume_of_a_run_killed_before_its_first_block_starts_again(work, monkeypatch, capsys):
    def interrupted_means(*args, **kwargs):
        raise KeyboardInterrupt

    out = work / "out"
    shutil.rmtree(out)
    with monkeypatch.context() as patch:
        patch.setattr(abq_method, "batch_means", interrupted_means)
        assert abq(work, "quantize", "recipe.yaml") == 130
    assert "before any block was checkpointed" in flat(capsys.readouterr().err)
    assert (out / outputs.MARKER).is_file() and not (out / "checkpoint" / "state.json").exists()
    rc = abq(work, "quantize", "recipe.yaml", "--resume")
    err = flat(capsys.readouterr().err)
    assert rc == 0, err
    assert "no checkpoint yet" in err and "starting from the beginning" in err
    assert_complete(out)


def _break_truncated(ckpt: Path) -> None:
    block = ckpt / "block_0001.safetensors"
    block.write_bytes(block.read_bytes()[: block.stat().st_size // 2])


def _break_corrupted(ckpt: Path) -> None:
    block = ckpt / "block_0000.safetensors"
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF
    block.write_bytes(bytes(data))


def _break_missing(ckpt: Path) -> None:
    (ckpt / "block_0000.safetensors").unlink()


def _break_state_not_json(ckpt: Path) -> None:
    (ckpt / "state.json").write_text('{"fingerprint": "ab')


def _break_state_shape(ckpt: Path) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    state["done"] = state["done"][:1]  # one entry short of log and block_sha256
    (ckpt / "state.json").write_text(json.dumps(state))


BROKEN_CHECKPOINTS = [
    ("truncated-block", _break_truncated, "block_0001.safetensors is truncated or corrupted"),
    ("corrupted-block", _break_corrupted, "block_0000.safetensors is truncated or corrupted"),
    ("missing-block", _break_missing, "checkpoint file missing"),
    ("state-not-json", _break_state_not_json, "is corrupted (not JSON"),
    ("state-wrong-shape", _break_state_shape, "is corrupted ('done', 'log' and 'block_sha256'"),
]


@pytest.mark.parametrize("case", BROKEN_CHECKPOINTS, ids=[c[0] for c in BROKEN_CHECKPOINTS])
def test_broken_checkpoint_is_refused_before_the_model_loads(work, case, monkeypatch, capsys):
    _, damage, expected = case
    out = work / "out"
    shutil.rmtree(out)
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 1)
        assert abq(work, "quantize", "recipe.yaml") == 130
    assert checkpoint_blocks(out) == 2
    damage(out / "checkpoint")
    no_model_load(monkeypatch)
    capsys.readouterr()
    before = snapshot(work.parent)
    rc = abq(work, "quantize", "recipe.yaml", "--resume")
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert expected in line and "--overwrite" in line
    assert snapshot(work.parent) == before
