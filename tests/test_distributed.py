"""Data-parallel calibration (`abqcli.distributed`) on a tiny LLaMA: `torchrun --nproc-per-node 2 -m abqcli
quantize` (gloo, CPU) against one process, a killed rank, and a resume with another number of processes.

Tolerance. Two processes compute the same steps as one: each window's forward and gradient is the same
computation wherever it runs (the block loss is computed window by window, `abqcli.quant.loss`), and
every statistic, Hessian, loss mean and gradient is reduced; only the order of summing differs, which for
two processes (a + b = b + a) changes nothing. So on 2 processes the first step's gradients, the codes
and the perplexity equal one process's exactly, for ABQ as for GPTQ; with more processes the ring
all-reduce may sum in another order (float rounding; GPTQ's test allows 0.01% of codes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abqcli.distributed import DataParallel
from abqcli.errors import InputError
from test_quantize_cli import abq, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DRIVER = Path(__file__).with_name("first_step_driver.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


def test_each_rank_takes_its_slice_of_every_global_batch():
    # batch_size 4 over 2 ranks: global batches [0..3], [4..7] -> rank 0 {0, 1, 4, 5}, rank 1 {2, 3, 6, 7}
    assert DataParallel(0, 2).local_windows(8, 4).tolist() == [0, 1, 4, 5]
    assert DataParallel(1, 2).local_windows(8, 4).tolist() == [2, 3, 6, 7]
    assert DataParallel.single().local_windows(5, 2).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match=r"batch_size \(3\) must be a multiple of 2"):
        DataParallel(0, 2).local_windows(6, 3)
    with pytest.raises(InputError, match=r"divide calibration.nsamples \(6\)"):
        DataParallel(1, 2).local_windows(6, 4)


def _recipe(directory: Path, model: Path, text: Path, method: str) -> Path:
    recipe = write_recipe(directory, model, text, "w4a8", batch_size=2,
                          calibration=f"method: {method}\nepochs: 2" + ("\ngptq: {sequential: true}" * (method == "gptq")))
    recipe.write_text(recipe.read_text().replace("  epochs: 5\n", "").replace("[hf-fakequant]", "[abq-packed]"))
    return recipe


def _launch(workdir: Path, processes: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` on one process, or under torchrun on `processes` (standalone rendezvous)."""
    run = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return subprocess.run([*run, *args], cwd=workdir, env=env or ENV, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture(scope="module")
def abq_runs(tmp_path_factory, tiny_llama, tiny_text_file) -> dict[str, Path]:
    """The same ABQ W4A8 recipe on one process and on two, each saving its first step's gradients."""
    runs = {}
    for name, processes in (("one", 1), ("two", 2)):
        workdir = tmp_path_factory.mktemp(f"abq-{name}")
        recipe = _recipe(workdir, tiny_llama, tiny_text_file, "abq")
        done = _launch(workdir, processes, str(DRIVER), "quantize", str(recipe),
                       env={**ENV, "ABQ_FIRST_STEP": str(workdir / "first_step.pt")})
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = workdir
    return runs


def _codes(export: Path) -> dict[str, torch.Tensor]:
    from abqcli.btc.format import packed_weight_from_tensors
    from abqcli.formats.abq_packed import load_packed_tensors, read_packed_export

    packed = read_packed_export(export)
    tensors = load_packed_tensors(packed.directory)
    return {name: packed_weight_from_tensors(name, tensors, meta, packed.version).codes()
            for name, meta in packed.modules.items()}


def _code_difference(a: Path, b: Path) -> float:
    ca, cb = _codes(a), _codes(b)
    assert ca.keys() == cb.keys()
    return sum(int((ca[n] != cb[n]).sum()) for n in ca) / sum(c.numel() for c in ca.values())


def _ppl(export: Path, text: Path) -> float:
    from abqcli.evaluate import EvalRequest, run_eval

    return run_eval(EvalRequest(str(export), str(text), None, 32, 4, "cpu", "float32")).ppl


def test_two_processes_take_the_first_step_of_one(abq_runs):
    one, two = (torch.load(abq_runs[k] / "first_step.pt") for k in ("one", "two"))
    assert len(one) == len(two) and any(g is not None for g in one)
    for a, b in zip(one, two, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), float((a - b).abs().max()) / float(a.abs().max())


def test_two_processes_give_the_single_process_export(abq_runs, tiny_text_file):
    from abqcli.verify import verify_export

    one, two = (abq_runs[k] / "out" / "abq-packed" for k in ("one", "two"))
    log = json.loads((abq_runs["two"] / "out" / "quant_log.json").read_text())
    assert log["processes"] == {"world_size": 2, "backend": "gloo", "windows_per_process": 2}
    assert _code_difference(one, two) == 0, _code_difference(one, two)
    assert _ppl(two, tiny_text_file) == _ppl(one, tiny_text_file)
    report = verify_export(two, dataset=str(tiny_text_file), seqlen=32, windows=2)
    assert report.ok, report.problems


def test_gptq_over_two_processes_sums_the_hessians(tmp_path, tiny_llama, tiny_text_file):
    one, two = tmp_path / "one", tmp_path / "two"
    for workdir in (one, two):
        _recipe(workdir, tiny_llama, tiny_text_file, "gptq")
    assert abq(one, "quantize", one / "recipe.yaml") == 0
    done = _launch(two, 2, "-m", "abqcli", "quantize", str(two / "recipe.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1/2: calibrating its share of the windows" in done.stderr
    assert _code_difference(one / "out" / "abq-packed", two / "out" / "abq-packed") <= 1e-4


def test_blockwise_loading_over_two_processes(tmp_path, tiny_llama, tiny_text_file):
    """Each rank reads every block itself and rank 0 writes the shards: the codes of one process that
    loaded the whole model."""
    one, two = tmp_path / "one", tmp_path / "two"
    for workdir in (one, two):
        _recipe(workdir, tiny_llama, tiny_text_file, "gptq")
    recipe = two / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(f"path: {tiny_llama}}}", f"path: {tiny_llama}, loading: blockwise}}"))
    assert "loading: blockwise" in recipe.read_text()
    assert abq(one, "quantize", one / "recipe.yaml") == 0
    done = _launch(two, 2, "-m", "abqcli", "quantize", str(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (two / "out" / "abq-packed" / "model.safetensors.index.json").is_file()
    assert _code_difference(one / "out" / "abq-packed", two / "out" / "abq-packed") <= 1e-4


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_a_killed_rank_stops_the_other_and_one_process_resumes(tmp_path, tiny_llama, tiny_text_file, capsys):
    """Rank 1 is killed (SIGKILL) during block 2: rank 0 stops with one line well inside the collective
    timeout, block 1 stays checkpointed, and `--resume` on one process completes it."""
    recipe = _recipe(tmp_path, tiny_llama, tiny_text_file, "abq")
    recipe.write_text(recipe.read_text().replace("epochs: 2", "epochs: 150"))
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    cmd = [sys.executable, "-m", "abqcli", "quantize", str(recipe), "--dist-timeout", "60"]
    rank0 = subprocess.Popen(cmd, cwd=tmp_path, env={**env, "RANK": "0"}, stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True)
    rank1 = subprocess.Popen(cmd, cwd=tmp_path, env={**env, "RANK": "1"}, stderr=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL)
    seen = []
    for line in rank0.stderr:
        seen.append(line)
        if line.startswith("block 1/2: loss"):
            break
    rank1.kill()
    rest = rank0.stderr.read()
    assert rank0.wait(timeout=50) == 1, "".join(seen) + rest
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 0/2: another process stopped answering" in errors[0], rest
    assert "Traceback" not in rest
    checkpoint = tmp_path / "out" / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    shutil.copy(checkpoint / "block_0000.safetensors", tmp_path / "block0.safetensors")

    assert abq(tmp_path, "quantize", recipe, "--resume") == 0
    assert "the checkpoint was written by 2 process(es), this run has 1" in " ".join(capsys.readouterr().err.split())
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "block0.safetensors"))
    codes = _codes(tmp_path / "out" / "abq-packed")
    block0 = [name for name in codes if name.startswith("model.layers.0.")]
    assert block0 and all(torch.equal(codes[n], saved[f"codes.{n[len('model.layers.0.'):]}"]) for n in block0)
