"""GPTQ rounding (`abqcli.quant.gptq`): exact bookkeeping against a direct re-implementation of the
paper's algorithm, lower output error than round-to-nearest, and the Hessians the block loop collects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from abqcli.quant.fakequant import QuantLinear
from abqcli.quant.gptq import HessianAccumulator, collect_hessians, gptq_quantize, inverse_hessian_factor
from abqcli.quant.methods import BlockContext
from abqcli.quant.methods.gptq import GptqMethod
from abqcli.quant.quantizer import LayerQuant, WeightQuantSpec, fake_quantize_activation, quantize_weight
from abqcli.recipe import load_recipe

SPECS = [
    WeightQuantSpec(4),  # per channel
    WeightQuantSpec(3, 32),  # groups
    WeightQuantSpec(3, 40),  # groups with a partial last group (96 = 2·40 + 16)
    WeightQuantSpec(2, 32, balance=True),  # W2*: five levels
]
SPEC_IDS = ["w4", "w3g32", "w3g40", "w2*g32"]


def layer_inputs(seed: int = 0, tokens: int = 512, k: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [48, k] and correlated inputs with uneven channel scales (what makes GPTQ matter)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(48, k, generator=gen)
    x = torch.randn(tokens, k, generator=gen) @ torch.randn(k, k, generator=gen) * 0.2
    x = x * torch.rand(k, generator=gen) * 3 + torch.randn(k, generator=gen)
    x[:, 5] = 0.0  # a dead input channel
    return w, x


def slow_gptq_codes(w: torch.Tensor, h: torch.Tensor, spec: WeightQuantSpec, damp: float,
                    order: torch.Tensor) -> torch.Tensor:
    """Frantar et al. 2022, Algorithm 1 without lazy batches: after each column, update every later
    column at once with that column's scaled error. Written independently of abqcli.quant.gptq."""
    ref = quantize_weight(w, spec)  # static groups: (scale, zero) per (row, group) of the input weight
    k = w.shape[1]
    group = torch.arange(k) // (spec.group_size or k)
    scale, zero = ref.scale.double()[:, group][:, order], ref.zero.double()[:, group][:, order]
    h = h.double()[order][:, order].clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    work = w.double()[:, order].clone()
    codes = torch.zeros_like(work)
    for j in range(k):
        q = torch.clamp(torch.round(work[:, j] / scale[:, j]) + zero[:, j], 0, spec.qmax)
        codes[:, j] = q
        err = (work[:, j] - (q - zero[:, j]) * scale[:, j]) / hinv[j, j]
        work[:, j:] -= torch.outer(err, hinv[j, j:])
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out.to(torch.uint8)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_codes_equal_the_direct_algorithm_code_for_code(spec, act_order):
    w, x = layer_inputs()
    acc = HessianAccumulator()
    acc.add(x)
    h = acc.hessian
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(96)
    state = gptq_quantize(w, h, spec, damp=0.01, act_order=act_order, block_size=16)  # 6 lazy blocks
    expected = slow_gptq_codes(w, h, spec, 0.01, order)
    assert torch.equal(state.codes, expected)
    rtn = quantize_weight(w, spec)
    assert torch.equal(state.scale, rtn.scale) and torch.equal(state.zero, rtn.zero)  # static groups
    assert not torch.equal(state.codes, rtn.codes)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_output_error_on_the_calibration_inputs_is_below_round_to_nearest(spec):
    w, x = layer_inputs(seed=1)
    acc = HessianAccumulator()
    acc.add(x)
    rtn = quantize_weight(w, spec).dequantize()
    gptq = gptq_quantize(w, acc.hessian, spec).dequantize()
    err_rtn = ((x @ (w - rtn).T) ** 2).mean()
    err_gptq = ((x @ (w - gptq).T) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_lwc_clipping_sets_the_grid():
    w, x = layer_inputs(seed=2)
    acc = HessianAccumulator()
    acc.add(x)
    spec = WeightQuantSpec(4, 32)
    lwc = (torch.full((48, 3), 1.0), torch.full((48, 3), 2.0))
    state = gptq_quantize(w, acc.hessian, spec, lwc=lwc)
    clipped = quantize_weight(w, spec, lwc)
    assert torch.equal(state.scale, clipped.scale) and torch.equal(state.zero, clipped.zero)


def test_lazy_block_size_does_not_change_the_codes_beyond_float_noise():
    w, x = layer_inputs(seed=3)
    acc = HessianAccumulator()
    acc.add(x)
    spec = WeightQuantSpec(3, 32)
    a = gptq_quantize(w, acc.hessian, spec, block_size=96).codes
    b = gptq_quantize(w, acc.hessian, spec, block_size=7).codes
    assert (a != b).float().mean() < 0.002  # the same arithmetic reordered: at most a rounding tie flips


class TwoBranches(nn.Module):
    """q/k share an input (one accumulator), o sees another; o's input is activation-quantized."""

    def __init__(self):
        super().__init__()
        self.q = QuantLinear(nn.Linear(8, 8), LayerQuant(WeightQuantSpec(4), 16))
        self.k = QuantLinear(nn.Linear(8, 8), LayerQuant(WeightQuantSpec(4), 16))
        self.o = QuantLinear(nn.Linear(8, 8), LayerQuant(WeightQuantSpec(4), 4))

    def forward(self, x):
        return self.o(self.q(x) * self.k(x))


def test_collect_hessians_sees_each_layer_input_as_the_layer_computes_it():
    torch.manual_seed(0)
    block = TwoBranches()
    batches = [torch.randn(2, 5, 8) for _ in range(3)]
    hessians = collect_hessians({"q": block.q, "k": block.k, "o": block.o},
                                lambda: [block(b) for b in batches])
    x = torch.cat([b.reshape(-1, 8) for b in batches])
    with torch.no_grad():
        o_in = fake_quantize_activation(block.q(x) * block.k(x), 4)
    torch.testing.assert_close(hessians["q"], (x.T @ x).double(), rtol=1e-5, atol=1e-5)
    assert hessians["k"] is hessians["q"]
    torch.testing.assert_close(hessians["o"], (o_in.T @ o_in).double(), rtol=1e-5, atol=1e-4)


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    _, x = layer_inputs(seed=4)
    acc = HessianAccumulator()
    acc.add(x)
    u = inverse_hessian_factor(acc.hessian, 0.01)
    h = acc.hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(96, dtype=torch.float64)
    assert torch.equal(u, u.triu()) and bool((torch.diagonal(u) > 0).all())
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h), rtol=1e-8, atol=1e-12)


def toy_context(block: TwoBranches, x: torch.Tensor) -> BlockContext:
    linears = {"q": block.q, "k": block.k, "o": block.o}
    return BlockContext(0, 1, block, block, linears, x, x, x, {}, torch.device("cpu"), 2)


@pytest.mark.parametrize("sequential", [False, True], ids=["one-pass", "sequential"])
def test_sequential_stages_see_the_earlier_stages_quantized(sequential):
    torch.manual_seed(1)
    block, x = TwoBranches(), torch.randn(6, 5, 8)
    original = {name: lin.weight.detach().clone() for name, lin in [("q", block.q), ("k", block.k), ("o", block.o)]}
    recipe = load_recipe("w4a16", ["calibration.method=gptq", f"calibration.gptq.sequential={str(sequential).lower()}"])
    states = GptqMethod(recipe, adapter=None).fold(toy_context(block, x))

    flat = x.reshape(-1, 8)
    h_in = (flat.T @ flat).double()
    for name in ("q", "k"):  # the first stage: the block's input, the same in both modes
        expected = gptq_quantize(original[name], h_in, WeightQuantSpec(4))
        assert torch.equal(states[name].codes, expected.codes), name
    q_w, k_w = (states[n].dequantize() if sequential else original[n] for n in ("q", "k"))
    o_in = fake_quantize_activation((flat @ q_w.T + block.q.bias) * (flat @ k_w.T + block.k.bias), 4)
    expected = gptq_quantize(original["o"], (o_in.T @ o_in).double(), WeightQuantSpec(4))
    assert torch.equal(states["o"].codes, expected.codes)
    assert torch.equal(block.o.weight, states["o"].dequantize())
