"""One adapter per architecture family: where the decoder blocks are, how a block is wired, and the
facts about the architecture that calibration depends on (as class attributes: data, not `family` tests).

The calibration loop, the LET transforms and the fake-quant wrappers only talk to a model through
an adapter, so supporting a new family means writing one class here (and adding it to ADAPTERS).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from accelerate.utils import send_to_device
from torch import nn

from abqcli.errors import InputError
from abqcli.models.experts import ExpertLinears, unfuse_experts
from abqcli.quant.cache import ActivationCache


@dataclass(frozen=True)
class LetPair:
    """A learnable equivalent transformation between a producer and the linears that consume its output.

    `producer` is a norm (scales its weight/bias) or a linear (scales its output rows; `rows` = (start,
    stop) when only a segment of them feeds the consumers, as v inside a fused qkv_proj); `consumers`
    are linears whose input columns get multiplied by the same per-channel scale. `float_readers` also
    read the producer's output but stay in float (a MoE router, whose `weight` is [E, H]): their columns
    get the same scale, so the transform stays an identity, and they play no part in its initialisation.
    """

    name: str
    producer: str
    consumers: tuple[str, ...]
    kind: str  # "norm" | "linear"
    rows: tuple[int, int] | None = None
    float_readers: tuple[str, ...] = ()


class _StopForward(Exception):
    pass


class Adapter:
    """Base class: the family-independent part.

    Architecture facts a family sets:
    rope:       positions enter q and k by RoPE (`rotate_half` mixes channel d with d + head_dim/2), so a
                q <-> k LET scale is tied over the two halves of each head to commute with it;
    qk_scaling: scaling q rows by r and k rows by 1/r leaves q·kᵀ exact (false for q/k norms between the
                projections and the product), so LET adds the q <-> k scale;
    let_shift:  the family's norms and their consumers have biases, so `calibration.let.shift: auto` turns
                LET shifts on for weight-activation runs (OPT);
    norm_weight_offset: the norms multiply by (offset + weight) (Gemma: 1 + w; others 0), which a
                norm-side LET scale must keep;
    experts / router: where a sparse MoE block keeps its experts (fused 3-D in transformers: abq
                quantizes them as one linear pair per expert, `models/experts.py`, after
                `prepare_model`) and its float router; "" for dense families.

    Rotations (`quant/rotations.py`) read where the residual stream enters and leaves the model: the
    token `embeddings`, the `final_norm` and the `lm_head`; in each block the `norm`-kind LET pairs (a
    norm and the linears that read it), the `residual_writers` (linears whose outputs are added to the
    stream), the `value_proj` / `attention_out` pair rotated per head, and `online_rotated` (linears
    whose input gets the online Hadamard transform). `rotation_problem` says why a family cannot be
    rotated exactly (None: it can).
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    blocks_path: str = ""
    attention: str = ""  # attention submodule name inside a block
    compensation_target: str = ""  # linear that gets compensation vectors (DESIGN §4)
    rope: bool = False
    qk_scaling: bool = True
    let_shift: bool = False
    norm_weight_offset: float = 0.0
    experts: str = ""
    router: str = ""
    embeddings: str = ""
    final_norm: str = ""
    lm_head: str = "lm_head"
    residual_writers: tuple[str, ...] = ()
    value_proj: str = ""
    attention_out: str = ""
    online_rotated: tuple[str, ...] = ()
    rotation_problem: str | None = "no rotation is defined for this architecture"

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def attention_module(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.attention)

    def prepare_model(self, model: nn.Module) -> None:
        """The model as abq quantizes it, in place: a MoE family's fused experts become one linear pair
        per expert (`models/experts.py`; the same function). Called by every loader that quantizes or
        opens a quantized export."""
        if self.experts:
            unfuse_experts(model, self.experts)

    def experts_of(self, block: nn.Module) -> ExpertLinears | None:
        """The block's unfused experts, or None (a dense block, or a dense family)."""
        if not self.experts:
            return None
        try:
            module = block.get_submodule(self.experts)
        except AttributeError:
            return None
        return module if isinstance(module, ExpertLinears) else None

    @staticmethod
    def matching(block: nn.Module, patterns: tuple[str, ...]) -> list[str]:
        """Names (relative to the block) of its modules that match one of the fnmatch `patterns`."""
        return [name for name, _ in block.named_modules() if any(fnmatch(name, p) for p in patterns)]

    def capture_block_inputs(self, model: nn.Module, windows: torch.Tensor,
                             cache: ActivationCache | None = None) -> tuple[torch.Tensor, list[dict]]:
        """The first block's input hidden states for every window, [n, T, H] in a `cache` tensor (default:
        float32 in RAM), and per block the keyword arguments the model passes to it (position
        embeddings, attention mask), on the CPU.

        The model runs with every block passing its input through unchanged (no block weight is read:
        they may not be loaded yet, `abqcli.models.blockwise`): what a block is given besides its hidden
        states does not depend on them. The keyword arguments come from the first window, block by
        block, as layers may differ (a sliding-window layer gets another mask than a full-attention
        one) and every window has the same length; the other windows stop at the first block."""
        blocks = self.blocks(model)
        hidden: torch.Tensor | None = None
        per_block: list[dict] = [{} for _ in blocks]

        def passthrough(index: int):
            def forward(*args, **kwargs):
                nonlocal hidden
                states = args[0] if args else kwargs["hidden_states"]
                if index == 0:
                    if hidden is None:
                        hidden = (cache or ActivationCache()).empty((len(windows), *states.shape[1:]))
                    hidden[window_index] = states[0].detach()
                if not per_block[index]:
                    per_block[index].update({k: v for k, v in kwargs.items()
                                             if k not in ("hidden_states", "cache", "use_cache", "past_key_values")})
                if index == len(blocks) - 1 or all(per_block):
                    raise _StopForward
                return states
            return forward

        for i, block in enumerate(blocks):
            block.forward = passthrough(i)
        device = next(model.get_input_embeddings().parameters()).device
        try:
            with torch.no_grad():
                for window_index, window in enumerate(windows):
                    try:
                        model(window.unsqueeze(0).to(device), use_cache=False)
                    except _StopForward:
                        pass
        finally:
            for block in blocks:
                del block.forward  # the class's forward again
        return hidden, [send_to_device(kwargs, "cpu") for kwargs in per_block]

    def let_pairs(self, block: nn.Module) -> list[LetPair]:
        raise NotImplementedError

    @staticmethod
    def linear_names(block: nn.Module) -> list[str]:
        """Names (relative to the block) of every nn.Linear in it, in definition order."""
        return [name for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]


def _attention_pairs() -> list[LetPair]:
    """The LET pairs of a pre-norm attention with separate q/k/v projections (llama, Mixtral, Gemma)."""
    return [
        LetPair("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
        LetPair("out", "self_attn.v_proj", ("self_attn.o_proj",), "linear"),
    ]


def _gated_mlp_pairs(norm: str) -> list[LetPair]:
    """The LET pairs of a gated MLP (gate_proj, up_proj, down_proj) that reads `norm`."""
    return [
        LetPair("gate_up", norm, ("mlp.gate_proj", "mlp.up_proj"), "norm"),
        LetPair("down", "mlp.up_proj", ("mlp.down_proj",), "linear"),
    ]


class LlamaAdapter(Adapter):
    """llama, mistral, qwen2 (q/k/v with biases), smollm: pre-norm RMSNorm blocks, RoPE, GQA."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    blocks_path = "model.layers"
    attention = "self_attn"
    compensation_target = "mlp.down_proj"
    rope = True
    embeddings = "model.embed_tokens"
    final_norm = "model.norm"
    residual_writers = ("self_attn.o_proj", "mlp.down_proj")
    value_proj = "self_attn.v_proj"
    attention_out = "self_attn.o_proj"
    online_rotated = ("mlp.down_proj",)
    rotation_problem = None

    def let_pairs(self, block: nn.Module) -> list[LetPair]:
        return [*_attention_pairs(), *_gated_mlp_pairs("post_attention_layernorm")]


class Qwen3Adapter(LlamaAdapter):
    """qwen3: the llama layout plus an RMSNorm over head_dim on q and on k (`q_norm`, `k_norm`) between
    the projections and RoPE. A per-channel scale on q's rows does not pass through that norm, so the
    q <-> k LET pair is dropped (`qk_scaling` false); every other pair (norm -> q/k/v, norm -> gate/up,
    v -> o, up -> down) and every rotation stays exact: the residual rotation acts on the projections'
    inputs, the per-head v/o rotation and the online transforms never meet the q/k norms."""

    family = "qwen3"
    model_types = ("qwen3",)
    qk_scaling = False


class MixtralAdapter(LlamaAdapter):
    """mixtral: the llama attention, and a sparse MoE MLP: a float router `mlp.gate` (weight [E, H],
    top-k of E experts) and E experts, quantized as `mlp.experts.<e>.gate_up_proj` (rows gate | up) and
    `mlp.experts.<e>.down_proj`. LET: norm -> q/k/v, q <-> k, v -> o as llama; the post-attention norm ->
    every expert's gate_up_proj (the router's columns get the same scale: its logits, hence the routing,
    are unchanged); per expert its up rows -> its down_proj. Compensation on o_proj (there is no single
    down_proj). Rotations as llama: the router reads the rotated stream like the experts, every expert's
    down_proj writes it and gets the online Hadamard transform. A block without experts (Qwen3-MoE's
    `mlp_only_layers`) is a llama block."""

    family = "mixtral"
    model_types = ("mixtral",)
    experts = "mlp.experts"
    router = "mlp.gate"
    compensation_target = "self_attn.o_proj"
    residual_writers = ("self_attn.o_proj", "mlp.down_proj", "mlp.experts.*.down_proj")
    online_rotated = ("mlp.down_proj", "mlp.experts.*.down_proj")

    def let_pairs(self, block: nn.Module) -> list[LetPair]:
        experts = self.experts_of(block)
        if experts is None:
            return super().let_pairs(block)
        names = [f"{self.experts}.{e}" for e in range(len(experts))]
        ffn = experts[0].down_proj.in_features
        return [
            *_attention_pairs(),
            LetPair("gate_up", "post_attention_layernorm", tuple(f"{e}.gate_up_proj" for e in names), "norm",
                    float_readers=(self.router,)),
            *(LetPair(f"down_{i}", f"{e}.gate_up_proj", (f"{e}.down_proj",), "linear", (ffn, 2 * ffn))
              for i, e in enumerate(names)),
        ]


class Qwen3MoeAdapter(MixtralAdapter):
    """qwen3_moe: Mixtral's MoE blocks (dense llama MLPs in `mlp_only_layers`) with Qwen3's q/k norms, so
    no q <-> k pair."""

    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    qk_scaling = False


class Phi3Adapter(Adapter):
    """phi3 (Phi-3, Phi-4): pre-norm RMSNorm blocks, RoPE, GQA, with fused projections quantized as the
    single linears they are: `qkv_proj` (rows q | k | v) and `gate_up_proj` (rows gate | up). The v → o
    and up → down pairs scale their producer's segment of rows; no q ↔ k pair (q and k are segments of
    one linear whose rows a q/k scale would have to split) and no rotation (the per-head v/o rotation
    and the norm folding of the llama path are written for separate q/k/v)."""

    family = "phi3"
    model_types = ("phi3",)
    blocks_path = "model.layers"
    attention = "self_attn"
    compensation_target = "mlp.down_proj"
    rope = True
    qk_scaling = False
    rotation_problem = ("rotations are not implemented for Phi-3's fused qkv_proj / gate_up_proj; "
                        "use calibration.rotation: none")

    def let_pairs(self, block: nn.Module) -> list[LetPair]:
        config = block.self_attn.config
        head_dim = int(block.self_attn.head_dim)
        q_rows = config.num_attention_heads * head_dim
        kv_rows = config.num_key_value_heads * head_dim
        ffn = block.mlp.down_proj.in_features
        return [
            LetPair("qkv", "input_layernorm", ("self_attn.qkv_proj",), "norm"),
            LetPair("gate_up", "post_attention_layernorm", ("mlp.gate_up_proj",), "norm"),
            LetPair("out", "self_attn.qkv_proj", ("self_attn.o_proj",), "linear", (q_rows + kv_rows, q_rows + 2 * kv_rows)),
            LetPair("down", "mlp.gate_up_proj", ("mlp.down_proj",), "linear", (ffn, 2 * ffn)),
        ]


class Gemma2Adapter(Adapter):
    """gemma2 (Gemma-2): RMSNorms that multiply by (1 + w), a norm after the
    attention and after the MLP (inside each residual branch: they read o_proj's and down_proj's
    outputs, which LET leaves unchanged), embeddings scaled by sqrt(hidden) (inside the model, before
    block 0), attention logit soft-capping (abq's attention runs it eagerly), alternating sliding and
    global layers (per-block masks). No rotation: the
    post-branch norms sit between the residual stream and the linears that write it."""

    family = "gemma2"
    model_types = ("gemma2",)
    blocks_path = "model.layers"
    attention = "self_attn"
    compensation_target = "mlp.down_proj"
    rope = True
    norm_weight_offset = 1.0
    rotation_problem = ("Gemma's norms after the attention and the MLP do not commute with a rotation of "
                        "the residual stream; use calibration.rotation: none")

    def let_pairs(self, block: nn.Module) -> list[LetPair]:
        return [*_attention_pairs(), *_gated_mlp_pairs("pre_feedforward_layernorm")]


class Gemma3Adapter(Gemma2Adapter):
    """gemma3_text: Gemma-2's layout plus q_norm / k_norm (no q <-> k pair, as for qwen3)."""

    family = "gemma3"
    model_types = ("gemma3_text",)
    qk_scaling = False


class OptAdapter(Adapter):
    """OPT: pre-norm LayerNorm blocks (with bias), learned positions, no GQA; no fc1 -> fc2 pair."""

    family = "opt"
    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    attention = "self_attn"
    compensation_target = "fc2"
    let_shift = True
    rotation_problem = ("OPT's LayerNorm subtracts each token's mean, which does not commute with a rotation "
                        "of the residual stream; use calibration.rotation: none")

    def let_pairs(self, block: nn.Module) -> list[LetPair]:
        return [
            LetPair("qkv", "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
            LetPair("fc1", "final_layer_norm", ("fc1",), "norm"),
            LetPair("out", "self_attn.v_proj", ("self_attn.out_proj",), "linear"),
        ]


ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, Qwen3Adapter, MixtralAdapter, Qwen3MoeAdapter, Phi3Adapter,
                                       Gemma2Adapter, Gemma3Adapter, OptAdapter)


def supported_model_types() -> list[str]:
    return [t for cls in ADAPTERS for t in cls.model_types]


def adapter_for_config(config) -> Adapter:
    """The adapter for a transformers config, or an InputError listing what abq supports."""
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
                raise InputError("unsupported architecture: OPT-350m style post-norm blocks are not supported")
            return cls()
    raise InputError(
        f"unsupported architecture: {model_type!r} (supported: {', '.join(supported_model_types())})"
    )


def adapter_for(model: nn.Module) -> Adapter:
    return adapter_for_config(model.config)
