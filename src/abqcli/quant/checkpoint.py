"""The calibration checkpoint: one run's fingerprint, and each completed block's state, so that an
interrupted run resumes at the next block and gives byte-identical results (not part of any method).

    <checkpoint>/state.json              {"fingerprint", "done": [{fp, q}], "log": [BlockLog], "block_sha256",
                                          "world_size"}
    <checkpoint>/block_0000.safetensors  param.<name> (the folded block), codes/scale/zero.<linear>

"done" holds the sha256 of each block's FP-chain and quantized-chain outputs (`chain_hash`): a resumed
block must reproduce them when the run has as many processes as the one that wrote them ("world_size",
1 when absent); with another number, the windows are batched differently, so the outputs can differ by
float rounding and are recorded anew instead (`Checkpoint.comparable`). Over several processes rank 0
writes the files (`abqcli.distributed`). "block_sha256" holds each block file's sha256: a truncated or corrupted file is refused
before the model loads (`read_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from abqcli.checksums import sha256_file
from abqcli.distributed import DataParallel
from abqcli.errors import InputError, RunError
from abqcli.quant.fakequant import QuantLinear
from abqcli.quant.quantizer import QuantizedWeight
from abqcli.recipe import Recipe

CHECKPOINT_STATE = "state.json"


@dataclass
class BlockLog:
    """What one block's calibration did (one entry of the checkpoint state and of quant_log.json).

    loss_first / loss_last: mean loss over the first / last epoch (None for RTN); expert_tokens: per
    experts module of a MoE block (name inside the block), the calibration tokens the FP model routes to
    each expert (an expert with 0 is rounded to nearest: `BlockContext.unrouted`)."""

    block: int
    loss_first: float | None
    loss_last: float | None
    seconds: float
    peak_memory_mb: float
    loss_terms_last: dict[str, float] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype: numpy has no bfloat16, so the bytes are taken as uint8)."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def chain_hash(chain: torch.Tensor, ranks: DataParallel, windows: torch.Tensor) -> str:
    """sha256 of a chain's outputs [n, T, H]: of the whole tensor on one process; over several, of the
    per-window hashes in window order (`windows`: the global index of each local window)."""
    if not ranks.active:
        return tensor_hash(chain)
    local = [(int(i), tensor_hash(chain[j])) for j, i in enumerate(windows)]
    pairs = sorted(pair for part in ranks.gather(local) for pair in part)
    return hashlib.sha256("".join(h for _, h in pairs).encode()).hexdigest()


# recipe fields that say where the run keeps things, not what it computes: a checkpoint made with one
# value resumes with another (`model.loading: full` and `blockwise` give the same codes, as do both caches)
WHERE_NOT_WHAT = (("model", "loading"), ("calibration", "cache"))
HASH_CHUNK = 1 << 22  # elements


def fingerprint(state: Iterable[tuple[str, torch.Tensor]], recipe: Recipe, windows: torch.Tensor) -> str:
    """sha256 over the model's state dict (`state`: (name, tensor) in name order), the recipe fields that
    change the calibrated blocks, and the data."""
    digest = hashlib.sha256()
    for name, tensor in state:
        digest.update(name.encode())
        for chunk in tensor.detach().reshape(-1).split(HASH_CHUNK):  # a float32 copy of a chunk at a time
            digest.update(chunk.cpu().float().numpy().tobytes())
    # `finetune` runs after the last block and changes none of them: a resume with other finetune
    # settings keeps the checkpointed blocks and runs only that stage anew
    relevant = {k: v for k, v in recipe.to_dict().items() if k not in ("output", "eval", "finetune")}
    for section, key in WHERE_NOT_WHAT:
        relevant[section].pop(key)
    digest.update(json.dumps(relevant, sort_keys=True).encode())
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()


def block_file_name(index: int) -> str:
    return f"block_{index:04d}.safetensors"


def _state_problem(state: object) -> str | None:
    """What is wrong with the shape of a parsed state.json, or None."""
    if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), str):
        return "not a checkpoint state (no fingerprint)"
    done, log, sums = state.get("done"), state.get("log"), state.get("block_sha256")
    if not all(isinstance(v, list) for v in (done, log, sums)) or not len(done) == len(log) == len(sums):
        return "'done', 'log' and 'block_sha256' are not lists of one entry per block"
    fields = {f.name for f in dataclass_fields(BlockLog)}
    required = {f.name for f in dataclass_fields(BlockLog) if f.default is MISSING and f.default_factory is MISSING}
    if not all(isinstance(d, dict) and set(d) == {"fp", "q"} for d in done):
        return "a 'done' entry is not {fp, q}"
    if not all(isinstance(entry, dict) and required <= set(entry) <= fields for entry in log):
        return "a 'log' entry is not a block log"
    if not all(isinstance(h, str) for h in sums):
        return "a 'block_sha256' entry is not a checksum"
    return None


def read_checkpoint(checkpoint_dir: Path) -> dict:
    """The state of a checkpoint, its shape and every block file's sha256 checked (without the model, so
    a resume is refused before any heavy work); InputError naming what is missing or corrupted."""
    path = checkpoint_dir / CHECKPOINT_STATE
    again = "run with --overwrite instead of --resume to start again"
    if not path.is_file():
        raise InputError(f"nothing to resume: no checkpoint at {path}")
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"checkpoint {path} is corrupted (not JSON: {exc}); {again}") from exc
    problem = _state_problem(state)
    if problem:
        raise InputError(f"checkpoint {path} is corrupted ({problem}); {again}")
    for index, expected in enumerate(state["block_sha256"]):
        block = checkpoint_dir / block_file_name(index)
        if not block.is_file():
            raise InputError(f"checkpoint file missing: {block}; {again}")
        if sha256_file(block) != expected:
            raise InputError(f"checkpoint file {block} is truncated or corrupted (checksum mismatch); {again}")
    return state


class Checkpoint:
    """One run's checkpoint directory and its state (`start` a new one or `resume` one)."""

    def __init__(self, directory: Path, state: dict, ranks: DataParallel):
        self.directory, self.state, self.ranks = directory, state, ranks
        self.comparable = state.get("world_size", 1) == ranks.world
        state["world_size"] = ranks.world

    @classmethod
    def start(cls, directory: Path, run_fingerprint: str, ranks: DataParallel) -> Checkpoint:
        """A new checkpoint: the files of an earlier run in `directory` are removed (by rank 0)."""
        if directory.exists() and ranks.rank == 0:
            for stale in directory.glob("*"):
                stale.unlink()
        return cls(directory, {"fingerprint": run_fingerprint, "done": [], "log": [], "block_sha256": []}, ranks)

    @classmethod
    def resume(cls, directory: Path, run_fingerprint: str, ranks: DataParallel) -> Checkpoint:
        """The checkpoint in `directory` (checked by `read_checkpoint`), made by this very run."""
        state = read_checkpoint(directory)
        if state["fingerprint"] != run_fingerprint:
            raise InputError(
                "cannot resume: the checkpoint was made with a different model, recipe or calibration data "
                f"({directory / CHECKPOINT_STATE}); run without --resume (and --overwrite) to start again"
            )
        return cls(directory, state, ranks)

    def blocks(self) -> int:
        """How many blocks (the first ones) are checkpointed."""
        return len(self.state["done"])

    def logs(self) -> list[BlockLog]:
        return [BlockLog(**entry) for entry in self.state["log"]]

    def load_block(self, index: int, qblock: nn.Module,
                   qlinears: dict[str, QuantLinear]) -> dict[str, QuantizedWeight]:
        """Load checkpointed block `index` into `qblock`; its linears' integer states."""
        tensors = load_file(str(self.directory / block_file_name(index)))
        qblock.load_state_dict({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")})
        return {rel: QuantizedWeight(tensors[f"codes.{rel}"], tensors[f"scale.{rel}"], tensors[f"zero.{rel}"],
                                     lin.quant.weight) for rel, lin in qlinears.items()}

    def check_block(self, index: int, fp_hash: str, q_hash: str) -> None:
        """A loaded block must reproduce the outputs the checkpoint recorded (`comparable`); else its
        outputs' hashes replace the recorded ones (written with the next block)."""
        done = {"fp": fp_hash, "q": q_hash}
        if not self.comparable:
            self.state["done"][index] = done
        elif self.state["done"][index] != done:
            raise RunError(f"cannot resume: block {index} reproduces different outputs than the "
                           "checkpoint recorded (different torch build or thread count?)")

    def save_block(self, index: int, qblock: nn.Module, states: dict[str, QuantizedWeight],
                   fp_hash: str, q_hash: str, logs: list[BlockLog]) -> None:
        """Record calibrated block `index`: its file (sha256 in the state) first, then the state atomically
        (rank 0 only)."""
        self.state["done"].append({"fp": fp_hash, "q": q_hash})
        self.state["log"] = [asdict(entry) for entry in logs]
        if self.ranks.rank != 0:
            return
        tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in qblock.state_dict().items()}
        for rel, qw in states.items():
            tensors[f"codes.{rel}"] = qw.codes.cpu().contiguous()
            tensors[f"scale.{rel}"] = qw.scale.cpu().contiguous()
            tensors[f"zero.{rel}"] = qw.zero.cpu().contiguous()
        self.directory.mkdir(parents=True, exist_ok=True)
        block_file = self.directory / block_file_name(index)
        save_file(tensors, str(block_file))
        self.state["block_sha256"] = [*self.state["block_sha256"][:index], sha256_file(block_file)]
        state_path = self.directory / CHECKPOINT_STATE
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(state_path)  # atomic: a kill leaves the previous state intact
