"""Blockwise loading (`model.loading: blockwise`): a model bigger than this machine's memory, one decoder
block at a time.

The model is built from its config without materialising its parameters (accelerate's
`init_empty_weights`: parameters on the meta device, buffers such as RoPE's inverse frequencies real);
the tensors outside the decoder blocks (embeddings, final norm, lm_head, tied ones once) are read from
the checkpoint's safetensors to embed the calibration windows (`outside_blocks`) and again to write the
export (`load_outside_blocks`), and each block's when the calibration loop reaches it (`materialize`),
to be dropped again once the block is quantized and written (`release`). With the
activation caches (`abqcli.quant.cache`) and the export streamed block by block
(`abqcli.formats.abq_packed.PackedShards`), a run's peak memory is about

    peak ≈ 2 · one block in float32 (the block and its FP teacher) + the block's training state
           + the activation caches + the runtime (torch, tokenizer)

while calibrating, and the weights outside the blocks (model dtype) + the runtime while embedding the
windows and writing the export's last shard

whatever the number of blocks. Reading a tensor maps its file (safetensors), so the checkpoint's bytes
count as page cache, not as this process's memory.

The checkpoint's tensor names must be the model's state-dict names (what transformers saves); one whose
names transformers converts while loading (another layout of the same architecture) is refused with a
pointer to `model.loading: full`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from abqcli.errors import InputError, name_list

FULL_LOADING_HINT = "use model.loading: full"


class CheckpointTensors:
    """The tensors of a model directory's safetensors files (one file or an index's shards), by name,
    read one file at a time."""

    def __init__(self, files: list[Path]):
        """`files`: already checked readable (`loading.check_model_files`)."""
        from safetensors import safe_open

        if not files:
            raise InputError(f"blockwise loading reads safetensors weights; this model has none: {FULL_LOADING_HINT}")
        self.location = {}
        for file in files:
            with safe_open(str(file), "pt") as fh:
                self.location.update(dict.fromkeys(fh.keys(), file))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `names` (each file opened once)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        tensors = {}
        for file, in_file in by_file.items():
            with safe_open(str(file), "pt") as fh:
                tensors.update({name: fh.get_tensor(name) for name in in_file})
        return tensors


class BlockwiseWeights:
    """A model whose decoder blocks are loaded on demand from `tensors` (see the module docstring).

    `aliases`: tied parameter names -> the one name the checkpoint holds them under."""

    def __init__(self, model: nn.Module, adapter, tensors: CheckpointTensors, dtype: torch.dtype, source: str):
        self.model, self.tensors, self.dtype, self.source = model, tensors, dtype, source
        self.block_prefixes = [adapter.block_prefix(i) for i in range(len(adapter.blocks(model)))]
        self.aliases = _stored_names(model, set(tensors.location), source)
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Every parameter's checkpoint tensor has its shape (read from the headers only)."""
        from safetensors import safe_open

        wanted: dict[Path, dict[str, list[int]]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            stored = self.aliases[name]
            wanted.setdefault(self.tensors.location[stored], {})[stored] = list(param.shape)
        wrong = []
        for file, shapes in sorted(wanted.items()):
            with safe_open(str(file), "pt") as fh:
                for stored, shape in shapes.items():
                    found = list(fh.get_slice(stored).get_shape())
                    if found != shape:
                        wrong.append(f"{stored} ({found} in the checkpoint, {shape} in the model)")
        if wrong:
            raise InputError(f"the checkpoint of {self.source} has weights of the wrong shape: {name_list(wrong)}")

    def _in_block(self, name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in self.block_prefixes)

    def _outside_blocks(self) -> list[str]:
        return [name for name in self.aliases if not self._in_block(name)]

    def load_outside_blocks(self) -> None:
        """Every parameter outside the decoder blocks, in the model dtype; tied ones share one tensor.
        Calibration changes none of them: they are needed to embed the calibration windows and to write
        the export, not in between (`outside_blocks`)."""
        self._load(self.model, self._outside_blocks(), "")
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    @contextmanager
    def outside_blocks(self) -> Iterator[None]:
        """The parameters outside the blocks loaded for the time of the `with` (embedding the windows)."""
        self.load_outside_blocks()
        try:
            yield
        finally:
            from accelerate.utils import set_module_tensor_to_device

            for name in self._outside_blocks():
                set_module_tensor_to_device(self.model, name, "meta")

    def materialize(self, index: int, block: nn.Module) -> None:
        """Block `index`'s parameters from the checkpoint, in the model dtype, on the CPU."""
        prefix = self.block_prefixes[index] + "."
        self._load(block, [prefix + name for name, _ in block.named_parameters()], prefix)

    @staticmethod
    def release(block: nn.Module) -> None:
        """Drop a block's tensors (its parameters and buffers go back to the meta device)."""
        block.to("meta")
        return_freed_memory_to_the_os()

    def _load(self, module: nn.Module, names: list[str], prefix: str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        stored = self.tensors.read(sorted({self.aliases[name] for name in names}))
        for name in names:
            set_module_tensor_to_device(module, name[len(prefix):], "cpu", value=stored[self.aliases[name]],
                                        dtype=self.dtype)

    def state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the model's whole state dict in name order, as `model.state_dict()` of the fully
        loaded model would give them (parameters in the model dtype, read one at a time; buffers as
        they are): what the run's fingerprint hashes without holding the model."""
        buffers = {name: buf for name, buf in self.model.state_dict().items() if name not in self.aliases}
        for name in sorted([*self.aliases, *buffers]):
            if name in buffers:
                yield name, buffers[name]
            else:
                yield name, self.tensors.read([self.aliases[name]])[self.aliases[name]].to(self.dtype)


def _stored_names(model: nn.Module, stored: set[str], source: str) -> dict[str, str]:
    """Each parameter name (tied ones included) -> the name the checkpoint holds it under; InputError
    naming the parameters it lacks."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    aliases, missing = {}, []
    for names in groups.values():
        found = [name for name in names if name in stored]
        if not found:
            missing.extend(names)
        for name in names:
            aliases[name] = found[0] if found else name
    if missing:
        raise InputError(f"the checkpoint of {source} lacks weights under the model's names (blockwise loading "
                         f"reads them by name): {name_list(sorted(missing))}; {FULL_LOADING_HINT}")
    return aliases


def return_freed_memory_to_the_os() -> None:
    """glibc's `malloc_trim(0)`: the free memory of the heap goes back to the OS. A dropped block's
    tensors are freed to glibc's heap, which does not shrink by itself (its mmap threshold rises with
    every large chunk freed, so the next block's tensors come from the heap too): measured on a 2-block
    2048-wide model, the resident memory between blocks grew by ~120 MB per block without this and
    stayed flat with it. (Forcing every large allocation to mmap instead, `mallopt`, does the same but
    slowed SmolLM2's calibration by 80%: every temporary then costs fresh pages.) Nothing happens where
    the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_skeleton(files: list[Path], source: str, config, dtype: torch.dtype, attention: str,
                  adapter) -> tuple[nn.Module, BlockwiseWeights]:
    """The model of `config` on the meta device (buffers real, tied parameters tied), with the
    `BlockwiseWeights` that loads its parameters from the safetensors `files` of the model `source`
    (named in messages)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    tensors = CheckpointTensors(files)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # not done on the meta device: the checkpoint then holds the tied tensor once
    return model.eval(), BlockwiseWeights(model, adapter, tensors, dtype, source)
