"""Data-parallel calibration over torch.distributed: `torchrun --nproc-per-node N -m abqcli quantize RECIPE`.

Every process (rank) holds the whole model and calibrates every block on its share of the calibration
windows. Global batch k of B = `calibration.batch_size` windows (windows kB .. kB+B−1, as one process
takes them) is split into N slices of B/N, rank r taking windows kB + r·B/N .. kB + (r+1)·B/N − 1, so
every optimiser step sees the windows a single process would. The block's learnable tensors stay the
same on every rank because everything that feeds them is reduced across ranks:

    LET init statistics   max |x| and the range ends over every rank's tokens (max / min: exact)
    tokens per expert     sum (exact)
    the loss              mean of the ranks' batch means = the global batch mean (equal slices)
    gradients             mean of the block's quantized parameters' gradients, before the backward to the
                          learned tensors of every optimiser step: the gradient of the global batch's loss
    GPTQ Hessians         sum Σ xᵀx over every rank's tokens

so the result differs from one process only by the order of float reductions. Rank 0 owns the output
(lock, checkpoint, exports); every rank reads the checkpoint on --resume, so on several machines the
output directory must be on a filesystem they share. Backend: nccl when calibrating on CUDA (rank r on
cuda:LOCAL_RANK), gloo on CPU. Every collective has a timeout: a rank that dies makes the others stop
with one line (`RunError`) instead of hanging.

`DataParallel.single()` is the one-process case; each method is then a no-op.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from abqcli.errors import InputError, RunError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads DEFAULT_TIMEOUT_S at start-up
    import torch

DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks of a run (rank 0 of 1: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    timeout_s: int = DEFAULT_TIMEOUT_S

    @classmethod
    def single(cls) -> DataParallel:
        return cls()

    @classmethod
    def from_environment(cls, device: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> DataParallel:
        """The ranks torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
        describes, with the process group started; a single process when WORLD_SIZE is unset or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        import torch
        import torch.distributed as dist

        backend = "nccl" if device.startswith("cuda") else "gloo"
        ranks = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), backend, timeout_s)
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(ranks.local_rank)
            try:
                dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            except (RuntimeError, ValueError) as exc:
                raise RunError(f"rank {ranks.rank}/{world}: cannot join the process group "
                               f"({_first_line(exc)})") from exc
        return ranks

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world}"

    def device(self, device: str) -> str:
        """The compute device of this rank: cuda:LOCAL_RANK for a CUDA run over several ranks."""
        return f"cuda:{self.local_rank}" if self.active and device.startswith("cuda") else device

    def local_windows(self, n: int, batch_size: int) -> torch.Tensor:
        """The indices of this rank's windows (module docstring); InputError when the batches do not
        split evenly."""
        import torch

        if not self.active:
            return torch.arange(n)
        if batch_size % self.world or n % batch_size:
            raise InputError(f"calibration over {self.world} processes splits every batch evenly: "
                             f"calibration.batch_size ({batch_size}) must be a multiple of {self.world} and "
                             f"divide calibration.nsamples ({n})")
        share = batch_size // self.world
        starts = torch.arange(0, n, batch_size) + self.rank * share
        return (starts[:, None] + torch.arange(share)[None, :]).reshape(-1)

    # ---- collectives (no-ops on one process) -------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce `t` in place with ReduceOp `op` (on the backend's device); `t` as is on one process."""
        if not self.active:
            return t
        import torch.distributed as dist

        buf = t.cuda() if self.backend == "nccl" and not t.is_cuda else t
        self._collective(lambda: dist.all_reduce(buf, op=getattr(dist.ReduceOp, op)))
        if buf is not t:
            t.copy_(buf)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, "SUM")

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, "MAX")

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, "MIN")

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks."""
        if not self.active:
            return value
        import torch

        return float(self.sum_(torch.tensor([value], dtype=torch.float64))[0]) / self.world

    def mean_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every parameter's gradient replaced by its mean over the ranks, in one all-reduce; a parameter
        no rank has a gradient for keeps None (as on one process: the optimiser then skips it)."""
        if not self.active or not params:
            return
        import torch

        flat = torch.cat([torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1),
                                     p.new_full((1,), float(p.grad is not None))]) for p in params])
        self.sum_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            grad, had = flat[offset:offset + n].view_as(p), float(flat[offset + n])
            p.grad = grad / self.world if had else None
            offset += n + 1

    def gather(self, obj: object) -> list[object]:
        """`obj` of every rank, in rank order (picklable objects: hashes, small lists)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[object] = [None] * self.world
        self._collective(lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            self._collective(dist.barrier)

    def close(self) -> None:
        import torch.distributed as dist

        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def _collective(self, call) -> None:
        """Run one collective; a failure or a timeout (another rank died or hung) becomes one RunError."""
        try:
            call()
        except (RuntimeError, ConnectionError) as exc:  # DistBackendError is a RuntimeError
            raise RunError(
                f"{self.label}: another process stopped answering ({_first_line(exc)}; timeout "
                f"{self.timeout_s} s); the blocks checkpointed so far are kept: rerun with --resume, with any "
                "number of processes") from exc


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, less a leading `[source.cc:123]` location."""
    text = str(exc).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(exc).__name__
    return line[:160]
