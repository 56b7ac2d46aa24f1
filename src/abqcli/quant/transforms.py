"""LET (learnable equivalent transformations) and compensation vectors of one decoder block (DESIGN §4).

Everything here is *functional*: `BlockTransform` owns only the learnable tensors, never modifies the
block, and `transformed_params()` returns new tensors for the block parameters the transforms touch, so

    torch.func.functional_call(block, {**dict(block.named_parameters()), **t.transformed_params()}, args, kw)

computes exactly the FP block (an identity transform; only quantization of the returned weights makes
it matter). Transforms, per `adapter.let_pairs(block)`:

- norm → linears (``kind="norm"``): output channel c of the norm is divided by s[c] (and, with a shift,
  has δ[c] subtracted first: weight' = w/s, bias' = (b − δ)/s; a Gemma norm multiplies by 1 + w, so
  there w' = (1 + w)/s − 1: `adapter.norm_weight_offset`); every consumer (and float reader: a MoE
  router) gets W' = W·diag(s) and, with a shift, bias' = bias + W·δ (the original W, before its column
  scaling).
- linear → linear (``kind="linear"``): producer rows and bias are divided by s (only the segment
  `pair.rows` of a fused producer: v inside qkv_proj, up inside gate_up_proj), the consumer's input
  columns are multiplied by s. Under GQA (v_proj → o_proj) the scale has one entry per *kv* channel and is
  repeated over the query groups: o_proj input index h·head_dim + d uses s[(h // groups)·head_dim + d],
  which is how transformers' `repeat_kv` maps query head h onto kv head h // groups.
- q ↔ k (where `adapter.qk_scaling`): q rows (and bias) times r, k rows (and bias) divided by r, r per kv
  head and channel, repeated over the query groups for q. With RoPE (`adapter.rope`, LLaMA family)
  `rotate_half` mixes channel d with d + head_dim/2, so r is stored as [kv_heads, head_dim/2] and
  duplicated over the two halves (RoPE then commutes with the scaling); without RoPE (OPT) r is a free
  [heads·head_dim] vector. OPT's `q·scaling` is linear and does not interfere.
- compensation vectors on `adapter.compensation_target`: W' = W_transformed + a·bᵀ (a init 0, b init 1).

Scales are parametrised directly (like OmniQuant) and initialised from activation statistics:
s = max|x|^α / max_rows|W|^(1−α), then any |s| < 1e-2 snaps to ±1e-2 (init only). The statistics are
over the consumers that ran: a MoE expert no calibration token was routed to has none, so it plays no
part in the shared norm pair's init and its own up → down pair is left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device
from torch import nn

from abqcli.distributed import DataParallel
from abqcli.errors import InputError
from abqcli.models.adapters import Adapter, LetPair

SCALE_FLOOR = 1e-2  # |s| below this snaps to ±SCALE_FLOOR at init (DESIGN §4)
WEIGHT_MAX_FLOOR = 1e-5  # guards max_rows|W| == 0 in the init formula
QK_PAIR = "qk"  # name of the q ↔ k scale in `BlockTransform.scales`


def _row_divisor(s: torch.Tensor, rows: tuple[int, int] | None, n: int) -> torch.Tensor:
    """Per producer row: s on the pair's segment `rows` (all rows when None), 1 elsewhere."""
    if rows is None:
        return s
    start, stop = rows
    return torch.cat([s.new_ones(start), s, s.new_ones(n - stop)])


# --------------------------------------------------------------------------------------------------
# activation statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class ActStats:
    """Per-input-channel statistics of one linear's input, float32 on the CPU.

    max_abs: max |x| over every token of every window, [C_in].
    shift:   (max + min) / 2 with max and min running over every token of every window (a plain
             running range centre, not OmniQuant's EMA: order-independent and deterministic), [C_in].
    """

    max_abs: torch.Tensor
    shift: torch.Tensor


def _is_linear(mod: nn.Module) -> bool:
    # QuantLinear (quant/fakequant.py) is not an nn.Linear subclass but holds the same weight/bias
    from abqcli.quant.fakequant import QuantLinear

    return isinstance(mod, (nn.Linear, QuantLinear))


class InputRanges:
    """Running max / min per input channel of every linear of a block while it is registered
    (`recording_input_ranges`): the raw material of `ActStats`."""

    def __init__(self, linears: dict[str, nn.Module]):
        self.linears = linears
        self.hi: dict[str, torch.Tensor] = {}
        self.lo: dict[str, torch.Tensor] = {}

    def hook(self, name: str):
        def record(_mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            cur_hi, cur_lo = x.amax(dim=0), x.amin(dim=0)
            if name in self.hi:
                torch.maximum(self.hi[name], cur_hi, out=self.hi[name])
                torch.minimum(self.lo[name], cur_lo, out=self.lo[name])
            else:
                self.hi[name], self.lo[name] = cur_hi, cur_lo

        return record

    def stats(self, ranks: DataParallel | None = None) -> dict[str, ActStats]:
        """`ActStats` of every linear that ran, keyed by its name relative to the block; with `ranks`,
        over every rank's inputs (max / min reduced: exact)."""
        if ranks is not None and ranks.active:
            _reduce_ranges(self.linears, self.hi, self.lo, ranks)
        return {
            name: ActStats(
                max_abs=torch.maximum(self.hi[name], -self.lo[name]).cpu(),
                shift=((self.hi[name] + self.lo[name]) / 2).cpu(),
            )
            for name in self.linears
            if name in self.hi
        }


@contextmanager
def recording_input_ranges(block: nn.Module) -> Iterator[InputRanges]:
    """Every nn.Linear (or QuantLinear) of `block` records the range of its inputs while inside."""
    linears = {name: mod for name, mod in block.named_modules() if name and _is_linear(mod)}
    ranges = InputRanges(linears)
    handles = [mod.register_forward_pre_hook(ranges.hook(name)) for name, mod in linears.items()]
    try:
        yield ranges
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_activation_stats(
    block: nn.Module, adapter: Adapter, inputs: Iterable[tuple[tuple, dict]], ranks: DataParallel | None = None
) -> dict[str, ActStats]:
    """Run `block(*args, **kwargs)` for each captured input and return the input statistics of every
    linear in the block that ran (`InputRanges.stats`).

    Input tensors are moved to the block's device. `adapter` is accepted for symmetry with the rest of
    the API; every nn.Linear (or QuantLinear) of the block is hooked.
    """
    del adapter
    try:
        device = next(block.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    windows = 0
    with recording_input_ranges(block) as ranges:
        for args, kwargs in inputs:
            block(*send_to_device(tuple(args), device), **send_to_device(dict(kwargs), device))
            windows += 1
    if windows == 0:
        raise ValueError("collect_activation_stats: no calibration inputs")
    return ranges.stats(ranks)


def _reduce_ranges(linears: dict[str, nn.Module], hi: dict[str, torch.Tensor], lo: dict[str, torch.Tensor],
                   ranks: DataParallel) -> None:
    """hi / lo of every linear maxed / minned over the ranks, in place (one all-reduce each, in the
    block's order); a linear that ran on no rank is left out."""
    for name, mod in linears.items():
        unseen = torch.full((mod.in_features,), torch.inf, device=mod.weight.device)
        h, low = ranks.max_(hi.get(name, -unseen)), ranks.min_(lo.get(name, unseen))
        if bool(torch.isfinite(h).any()):
            hi[name], lo[name] = h, low


# --------------------------------------------------------------------------------------------------
# scale initialisation
# --------------------------------------------------------------------------------------------------


def snap_scale(s: torch.Tensor, floor: float = SCALE_FLOOR) -> torch.Tensor:
    """Scales with |s| < floor become ±floor (sign kept; 0 becomes +floor)."""
    sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
    return torch.where(s.abs() < floor, sign * floor, s)


def init_scale(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|x|^α / max_rows|W|^(1−α), snapped to |s| ≥ 1e-2."""
    act = act_max.double().clamp_min(0.0)
    w = weight_max.double().clamp_min(WEIGHT_MAX_FLOOR)
    return snap_scale(act.pow(alpha) / w.pow(1.0 - alpha))


# --------------------------------------------------------------------------------------------------
# the block transform
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """How one LET pair is applied: pair, channel count, query-group repeat for the consumer side."""

    pair: LetPair
    channels: int
    groups: int  # consumer in_features == channels * groups (GQA v -> o); 1 otherwise
    head_dim: int
    shift: bool


class BlockTransform(nn.Module):
    """Learnable LET scales/shifts and compensation vectors of one block, applied functionally.

    The block is *not* registered as a submodule: `parameters()` / `state_dict()` of this module hold
    only the learned tensors (`scales.<pair>`, `shifts.<pair>`, `comp_a`, `comp_b`), which makes them
    easy to checkpoint. Learnable tensors are float32 (float64 when the block is float64) on the
    block's device; `transformed_params()` returns tensors in each parameter's own dtype.

    let:          LET scales on every adapter pair plus the q ↔ k scale (no LET tensors at all if False).
    alpha:        migration strength of the scale init.
    shift:        learnable shifts on the "norm" pairs (OPT); needs a norm bias and consumer biases,
                  else InputError.
    compensation: a·bᵀ on `adapter.compensation_target`.
    stats:        from `collect_activation_stats` on the FP block; None initialises scales to 1 and
                  shifts to 0.
    """

    def __init__(
        self,
        block: nn.Module,
        adapter: Adapter,
        stats: dict[str, ActStats] | None,
        let: bool,
        alpha: float = 0.5,
        shift: bool = False,
        compensation: bool = False,
    ):
        super().__init__()
        self._block = (block,)  # a tuple keeps nn.Module from registering it
        self.adapter = adapter
        self.let = let
        self.alpha = alpha
        self.shift = shift and let
        self.compensation = compensation
        self.scales = nn.ParameterDict()
        self.shifts = nn.ParameterDict()
        self.comp_a: nn.Parameter | None = None
        self.comp_b: nn.Parameter | None = None
        self._plans: list[_Plan] = []
        self._qk: tuple[str, str, int, int, bool] | None = None  # q name, k name, kv heads, head_dim, rope

        ref = next(block.parameters())
        self._dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        self._device = ref.device

        if let:
            for pair in adapter.let_pairs(block):
                if not self._behind_online_transform(pair):
                    self._add_pair(pair, stats)
            self._add_qk()
        if compensation:
            target = adapter.compensation_target
            w = self._linear(target).weight
            self.comp_a = nn.Parameter(torch.zeros(w.shape[0], dtype=self._dtype, device=self._device))
            self.comp_b = nn.Parameter(torch.ones(w.shape[1], dtype=self._dtype, device=self._device))

    # ---- construction -----------------------------------------------------------------------------

    @property
    def block(self) -> nn.Module:
        return self._block[0]

    def _linear(self, name: str) -> nn.Module:
        try:
            mod = self.block.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"block has no module {name!r} (adapter {self.adapter.family})") from exc
        if not _is_linear(mod):
            raise ValueError(f"{name!r} is not a linear layer ({type(mod).__name__})")
        return mod

    def _attention_dims(self) -> tuple[int, int, int]:
        """(query heads, kv heads, head_dim) of the block's attention, from its config."""
        attn = self.block.get_submodule(self.adapter.attention)
        heads = int(attn.config.num_attention_heads)
        return heads, int(getattr(attn.config, "num_key_value_heads", None) or heads), int(attn.head_dim)

    def _behind_online_transform(self, pair: LetPair) -> bool:
        """A consumer transforms its input online (a rotated model's down_proj): a per-channel scale
        before the transform is not a column scaling of the weight after it, so the pair is left out."""
        return any(getattr(getattr(self._linear(c), "quant", None), "input_transform", None)
                   for c in pair.consumers)

    def _add_pair(self, pair: LetPair, stats: dict[str, ActStats] | None) -> None:
        if stats is not None and not any(c in stats for c in pair.consumers):
            return  # no consumer ran (an expert no token was routed to): nothing to initialise it from
        consumers = [self._linear(c) for c in pair.consumers]
        producer = self._producer(pair)
        channels = producer.weight.shape[0] if pair.rows is None else pair.rows[1] - pair.rows[0]
        groups, head_dim = self._consumer_groups(pair, channels, consumers)
        plan = _Plan(pair, channels, groups, head_dim, self._pair_has_shift(pair, producer, consumers))
        if stats is None:
            scale = torch.ones(channels, dtype=torch.float64)
            delta = torch.zeros(channels, dtype=torch.float64)
        else:
            scale, delta = self._initial_scale_shift(plan, consumers, stats)
        self.scales[pair.name] = nn.Parameter(scale.to(self._dtype).to(self._device))
        if plan.shift:
            self.shifts[pair.name] = nn.Parameter(delta.to(self._dtype).to(self._device))
        self._plans.append(plan)

    def _producer(self, pair: LetPair) -> nn.Module:
        """The pair's norm (with a weight) or producing linear."""
        if pair.kind == "norm":
            norm = self.block.get_submodule(pair.producer)
            if getattr(norm, "weight", None) is None:
                raise ValueError(f"LET pair {pair.name}: norm {pair.producer!r} has no weight")
            return norm
        if pair.kind == "linear":
            return self._linear(pair.producer)
        raise ValueError(f"LET pair {pair.name}: unknown kind {pair.kind!r}")

    def _consumer_groups(self, pair: LetPair, channels: int, consumers: list[nn.Module]) -> tuple[int, int]:
        """(query groups, head_dim) of the consumer side: (1, 1) unless the consumers take every producer
        channel repeated over the query groups (GQA v_proj -> o_proj)."""
        in_features = {c.weight.shape[1] for c in consumers}
        if len(in_features) != 1:
            raise ValueError(f"LET pair {pair.name}: consumers disagree on in_features {sorted(in_features)}")
        fan_in = in_features.pop()
        if fan_in == channels:
            return 1, 1
        # GQA v_proj -> o_proj: o's input has every kv head repeated over its query group
        _, _, head_dim = self._attention_dims()
        if pair.kind != "linear" or fan_in % channels or channels % head_dim:
            raise ValueError(
                f"LET pair {pair.name}: {pair.producer} gives {channels} channels, consumers take {fan_in}"
            )
        return fan_in // channels, head_dim

    def _pair_has_shift(self, pair: LetPair, producer: nn.Module, consumers: list[nn.Module]) -> bool:
        """Whether the pair gets a learnable shift: with `shift`, every "norm" pair (InputError when the
        norm or a consumer has no bias to fold it into)."""
        if not (self.shift and pair.kind == "norm"):
            return False
        readers = [*zip(pair.consumers, consumers), *((r, self.block.get_submodule(r)) for r in pair.float_readers)]
        missing = [name for name, m in readers if getattr(m, "bias", None) is None]
        if getattr(producer, "bias", None) is None:
            missing.insert(0, pair.producer)
        if missing:
            raise InputError(
                f"LET shift needs biases, but {', '.join(missing)} of this {self.adapter.family} block "
                "has none; set calibration.let.shift to false (or auto)"
            )
        return True

    def _initial_scale_shift(self, plan: _Plan, consumers: list[nn.Module],
                             stats: dict[str, ActStats]) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, δ) at init from the FP block's activation statistics (float64, CPU): `init_scale` over the
        max of the input and weight columns of every consumer that ran, δ the first one's input range
        centre."""
        ran = [(name, c) for name, c in zip(plan.pair.consumers, consumers) if name in stats]
        act = torch.stack([stats[name].max_abs.double().cpu() for name, _ in ran]).amax(dim=0)
        wmax = torch.stack([c.weight.detach().abs().amax(dim=0).double().cpu() for _, c in ran]).amax(0)
        scale = init_scale(self._reduce_groups(act, plan), self._reduce_groups(wmax, plan), self.alpha)
        return scale, stats[ran[0][0]].shift.double().cpu()

    @staticmethod
    def _reduce_groups(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Consumer-side [kv_heads·groups·head_dim] statistic -> per producer channel (max over groups)."""
        if plan.groups == 1:
            return x
        return x.view(-1, plan.groups, plan.head_dim).amax(dim=1).reshape(-1)

    @staticmethod
    def _expand_groups(s: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Producer-channel scale -> consumer input columns (kv head h·head_dim+d serves query heads
        h·groups .. h·groups+groups-1, as in transformers' repeat_kv)."""
        if plan.groups == 1:
            return s
        return s.view(-1, plan.head_dim).repeat_interleave(plan.groups, dim=0).reshape(-1)

    def _add_qk(self) -> None:
        if not self.adapter.qk_scaling:
            return
        attn = self.adapter.attention
        q_name, k_name = f"{attn}.q_proj", f"{attn}.k_proj"
        try:
            self.block.get_submodule(q_name)
            self.block.get_submodule(k_name)
        except AttributeError:
            return
        _, kv_heads, head_dim = self._attention_dims()
        rope = self.adapter.rope
        if rope:
            if head_dim % 2:
                raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
            shape: tuple[int, ...] = (kv_heads, head_dim // 2)
        else:
            shape = (kv_heads * head_dim,)
        self.scales[QK_PAIR] = nn.Parameter(torch.ones(shape, dtype=self._dtype, device=self._device))
        self._qk = (q_name, k_name, kv_heads, head_dim, rope)

    # ---- public API -------------------------------------------------------------------------------

    def let_parameters(self) -> list[nn.Parameter]:
        """LET scales (one per pair, plus the q ↔ k scale) and, with shift, the shifts."""
        return [*self.scales.values(), *self.shifts.values()]

    def compensation_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.comp_a, self.comp_b) if p is not None]

    def qk_scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q row multiplier [q_heads·head_dim], k row multiplier [kv_heads·head_dim]) or None."""
        if self._qk is None:
            return None
        q_name, _, kv_heads, head_dim, rope = self._qk
        r = self.scales[QK_PAIR]
        r = torch.cat([r, r], dim=-1) if rope else r.view(kv_heads, head_dim)  # [kv_heads, head_dim]
        groups = self._linear(q_name).weight.shape[0] // (kv_heads * head_dim)
        return r.repeat_interleave(groups, dim=0).reshape(-1), r.reshape(-1)

    def transformed_params(self) -> dict[str, torch.Tensor]:
        """New values of every block parameter the transforms touch (differentiable w.r.t. the learned
        tensors; the block is never modified). Keys are the block's `named_parameters()` names."""
        block = self.block
        out: dict[str, torch.Tensor] = {}

        def get(name: str) -> torch.Tensor:
            if name not in out:
                out[name] = block.get_parameter(name).to(self._dtype)
            return out[name]

        def has(name: str) -> bool:
            mod_name, _, attr = name.rpartition(".")
            return getattr(block.get_submodule(mod_name), attr, None) is not None

        # input side first: a shift is folded with W before W's column scaling (row scaling may come
        # before or after, it commutes with both)
        for plan in self._plans:
            pair = plan.pair
            s = self.scales[pair.name]
            delta = self.shifts[pair.name] if plan.shift else None
            if pair.kind == "norm":
                w_name, offset = f"{pair.producer}.weight", self.adapter.norm_weight_offset
                out[w_name] = (get(w_name) + offset) / s - offset  # the norm multiplies by offset + weight
                b_name = f"{pair.producer}.bias"
                if has(b_name):
                    b = get(b_name)
                    out[b_name] = (b - delta) / s if delta is not None else b / s
            else:
                w_name, b_name = f"{pair.producer}.weight", f"{pair.producer}.bias"
                rows = _row_divisor(s, pair.rows, get(w_name).shape[0])
                out[w_name] = get(w_name) / rows[:, None]
                if has(b_name):
                    out[b_name] = get(b_name) / rows
            cols = self._expand_groups(s, plan)
            for c in (*pair.consumers, *pair.float_readers):
                w_name, b_name = f"{c}.weight", f"{c}.bias"
                w = get(w_name)
                if delta is not None:
                    out[b_name] = get(b_name) + w @ delta
                out[w_name] = w * cols[None, :]

        qk = self.qk_scales()
        if qk is not None:
            q_name, k_name = self._qk[0], self._qk[1]
            for name, mult in ((q_name, qk[0]), (k_name, 1.0 / qk[1])):
                out[f"{name}.weight"] = get(f"{name}.weight") * mult[:, None]
                if has(f"{name}.bias"):
                    out[f"{name}.bias"] = get(f"{name}.bias") * mult

        if self.comp_a is not None:
            w_name = f"{self.adapter.compensation_target}.weight"
            out[w_name] = get(w_name) + self.comp_a[:, None] * self.comp_b[None, :]

        return {name: t.to(block.get_parameter(name).dtype) for name, t in out.items()}

    @torch.no_grad()
    def fold(self) -> None:
        """Write the transformed parameters into the block in place (FP fold, no quantization)."""
        new = self.transformed_params()
        for name, t in new.items():
            self.block.get_parameter(name).copy_(t)
