"""docs/FORMAT.md is enough to decode an export: a decoder written from the document alone (numpy and
safetensors, no abq code) recovers every quantized weight abq exported, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from abqcli.quant.quantizer import LayerQuant, WeightQuantSpec
from test_export_packed import rtn_model


def decode_codes(planes: np.ndarray, k: int) -> np.ndarray:
    """§3: q[n, k] = Σ_p ((planes[p, n, k // 32] >> (k % 32)) & 1) << p, for the real columns."""
    cols = np.arange(k)
    words = planes[:, :, cols // 32].astype(np.uint64)  # [P, N, K]
    bits = (words >> (cols % 32).astype(np.uint64)) & 1
    return sum(bits[p] << np.uint64(p) for p in range(planes.shape[0])).astype(np.int64)


def decode_zeros(stream: np.ndarray, count: int, width: int) -> np.ndarray:
    """§2.1: value i is stream bits i·P … i·P + P − 1, LSB first; stream bit j is bit j % 8 of byte j // 8."""
    j = np.arange(count * width)
    bits = (stream[j // 8].astype(np.int64) >> (j % 8)) & 1
    return (bits.reshape(count, width) << np.arange(width)).sum(axis=1)


def decode_weight(tensors: dict[str, np.ndarray], name: str, meta: dict) -> np.ndarray:
    """§2: W[n, k] = (qw[n, k] − zw[n, k // g]) · sw[n, k // g], in float32."""
    n, k = meta["out_features"], meta["in_features"]
    qmax = 4 if meta["balance"] else 2 ** meta["bits"] - 1
    planes = tensors[f"{name}.btc_planes"]
    assert planes.dtype == np.uint32 and planes.shape[0] == int(qmax).bit_length()
    g = meta["group_size"] or k
    groups = -(-k // g)
    scales = tensors[f"{name}.btc_scales"].astype(np.float32)
    zeros = decode_zeros(tensors[f"{name}.btc_zeros"], n * groups, planes.shape[0]).reshape(n, groups)
    col_group = np.arange(k) // g
    codes = decode_codes(planes, k)
    assert codes.max() <= qmax and zeros.max() <= qmax
    return (codes.astype(np.float32) - zeros[:, col_group].astype(np.float32)) * scales[:, col_group]


@pytest.mark.parametrize("quant", [
    LayerQuant(WeightQuantSpec(4, None), 4),
    LayerQuant(WeightQuantSpec(3, 48), 16),  # K = 64 and 128: partial last groups
    LayerQuant(WeightQuantSpec(2, 32, True), 16),  # W2*: 3 planes, 3-bit zero points
])
def test_a_decoder_written_from_format_md_recovers_every_weight(tiny_llama, tmp_path, quant):
    from abqcli.formats import ExportInput
    from abqcli.formats.abq_packed import ABQ_PACKED

    model, tokenizer, layers, states = rtn_model(tiny_llama, quant, 16)
    out = tmp_path / "packed"
    ABQ_PACKED.write(out, ExportInput(model, tokenizer, "scheme: test\n", 16, layers, states, {"method": "rtn"}))
    modules = json.loads(Path(out / "config.json").read_text())["quantization_config"]["modules"]
    tensors = load_file(str(out / "model.safetensors"))
    assert set(modules) == set(states)
    for name, meta in modules.items():
        expected = states[name].dequantize().numpy()
        np.testing.assert_array_equal(decode_weight(tensors, name, meta), expected)


@pytest.mark.parametrize("bits,clip", [(4, 1.0), (4, 0.9), (6, 0.75), (8, 0.5)])
def test_the_activation_quantizer_of_format_md_is_abqs(bits, clip):
    """§1 in float32 numpy: lo = r·min(x), hi = r·max(x), s = clamp((hi − lo)/qmax, 1e-5, 1e4),
    z = round(−lo/s), q = clamp(round(x/s) + z, 0, qmax), r the float32 value of `act_clip`."""
    import torch

    from abqcli.quant.quantizer import quantize_activation

    x = (np.random.default_rng(bits).standard_normal((16, 576)) * np.linspace(0.01, 50, 16)[:, None]).astype(np.float32)
    f32, r, qmax = np.float32, np.float32(clip), 2**bits - 1
    lo, hi = (x.min(axis=1, keepdims=True) * r).astype(f32), (x.max(axis=1, keepdims=True) * r).astype(f32)
    s = np.clip((hi - lo) / f32(qmax), f32(1e-5), f32(1e4)).astype(f32)
    z = np.rint(-lo / s).astype(f32)
    q = np.clip(np.rint(x / s) + z, 0, qmax).astype(np.uint8)
    codes, scale, zero = quantize_activation(torch.from_numpy(x), bits, clip)
    np.testing.assert_array_equal(codes.numpy(), q)
    np.testing.assert_array_equal(scale.numpy(), s)
    np.testing.assert_array_equal(zero.numpy(), z)
