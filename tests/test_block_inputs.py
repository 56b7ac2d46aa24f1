"""The keyword arguments each decoder block gets during calibration are the ones the model passes to that
block: on a model whose layers differ (a Qwen2 with full attention in layer 0 and a sliding window in
layer 1), block by block on the captured inputs must give what the blocks compute inside a full forward."""

from __future__ import annotations

import pytest
import torch

from conftest import mixed_qwen2_config, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEQLEN, WINDOW = 48, 8  # windows far longer than the sliding window, so the two masks really differ


@pytest.fixture(scope="module")
def mixed_qwen2(tmp_path_factory):
    return save_tiny_model(mixed_qwen2_config(WINDOW), tmp_path_factory.mktemp("models") / "tiny-qwen2-mixed", seed=4)


def blocks_match_full_forward(directory) -> list[dict]:
    """Assert that each block run on the captured inputs and its own keyword arguments gives what it
    computes inside full forwards of the model at `directory`; returns the per-block keyword arguments.
    (`test_adapter_contract` runs it on every claimed model type.)"""
    from abqcli.models.adapters import adapter_for
    from abqcli.models.loading import load_model
    from abqcli.quant.fakequant import set_kv_quant

    model, _, _ = load_model(str(directory), "float32", "cpu")
    adapter = adapter_for(model)
    set_kv_quant(model, adapter, 16)  # as the calibration loop runs the blocks
    windows = torch.randint(4, 200, (3, SEQLEN), generator=torch.Generator().manual_seed(0))
    blocks = adapter.blocks(model)
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(
        (out[0] if isinstance(out, tuple) else out).detach())) for i, block in enumerate(blocks)]
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    hidden, block_kwargs = adapter.capture_block_inputs(model, windows)
    assert len(block_kwargs) == len(blocks)
    with torch.no_grad():
        for i, (block, kwargs) in enumerate(zip(blocks, block_kwargs)):
            hidden = torch.cat([block(hidden[w:w + 1], **kwargs) for w in range(len(hidden))])
            expected = torch.cat(outputs[i])
            assert float((hidden - expected).abs().max() / expected.abs().max()) < 1e-6, f"block {i}"
    return block_kwargs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "opt", "mixed-qwen2"])
def test_blocks_on_captured_inputs_equal_the_full_forward(arch, tiny_models, mixed_qwen2):
    block_kwargs = blocks_match_full_forward(mixed_qwen2 if arch == "mixed-qwen2" else tiny_models[arch])
    if arch == "mixed-qwen2":
        full, sliding = (kwargs["attention_mask"] for kwargs in block_kwargs)
        assert full is None and sliding is not None  # causal SDPA for layer 0, a sliding-window mask for 1
