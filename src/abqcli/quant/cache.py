"""Where the calibration loop keeps its activation caches (`calibration.cache`, `calibration.cache_dtype`).

The loop holds at most five [n, T, H] tensors of a block at once: the FP-chain input and output, the
quantized-chain input and output, and (ABQ) the FP block on the quantized chain, so the caches take

    cache_bytes = 5 · n · T · H · itemsize(cache dtype)

(n: this process's calibration windows, T: calibration.seqlen, H: hidden size). `memory` keeps them as
ordinary tensors; `disk` maps each into a file under the output's checkpoint directory (`torch.from_file`,
shared): the kernel pages them in and out, so RAM holds only what is being read or written, and the file's
name is removed as soon as it is mapped, so no exit leaves it behind. `auto` is `disk` when cache_bytes
exceeds the memory budget (`abq quantize --max-memory`, default half of this machine's RAM), else `memory`.
The dtype is the model's (`model.dtype`) unless `cache_dtype: float32`; a block always computes in
float32 and each cached output is rounded to the cache dtype once.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from abqcli.errors import InputError

CACHES_PER_BLOCK = 5
MEMORY, DISK, AUTO = "memory", "disk", "auto"
_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*(k|m|g|t)?i?b?\s*")
_UNITS = {None: 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass
class ActivationCache:
    """Allocates the loop's [n, T, H] tensors: in RAM (`directory` None) or memory-mapped under `directory`."""

    dtype: torch.dtype = torch.float32
    directory: Path | None = None
    _count: itertools.count = field(default_factory=itertools.count, repr=False)

    @property
    def place(self) -> str:
        return MEMORY if self.directory is None else DISK

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of `shape` in the cache dtype, where this cache keeps them."""
        if self.directory is None:
            return torch.empty(shape, dtype=self.dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"activations-{os.getpid()}-{next(self._count):06d}.bin"
        mapped = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=self.dtype)
        path.unlink()  # the mapping keeps the pages; the disk space goes with the tensor
        return mapped.view(shape)


def parse_size(text: str) -> int:
    """Bytes of a size such as `8GB`, `8GiB`, `512M` or `1.5G` (binary units); InputError otherwise."""
    match = _SIZE.fullmatch(text)
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--max-memory: expected a size such as 8GB or 512MB, got {text!r}")
    unit = match.group(2).lower() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


def default_budget() -> int:
    """Half of this machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def cache_bytes(windows: int, seqlen: int, hidden: int, dtype: torch.dtype) -> int:
    return CACHES_PER_BLOCK * windows * seqlen * hidden * dtype.itemsize


def choose_cache(place: str, dtype: torch.dtype, needed: int, budget: int | None, directory: Path) -> ActivationCache:
    """The cache a run uses: `place` as the recipe says, `auto` resolved against the budget."""
    if place == AUTO:
        place = DISK if needed > (budget if budget is not None else default_budget()) else MEMORY
    return ActivationCache(dtype, directory if place == DISK else None)
