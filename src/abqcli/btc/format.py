"""BTC bit-plane format, version 5 (version 3's tensors, which may be sharded, and a clip ratio per activation quantizer; DESIGN §5; the public description is docs/FORMAT.md).

Codes are unsigned integers in [0, qmax]; a weight [N, K] is stored as `num_planes(qmax)` bit planes.
K is padded with code 0 to Kp, a multiple of `K_ALIGN` (128; the constants are `abqcli.btc.contract`);
plane p holds bit p of every code; each row of a plane is Kp/32 words of 32 bits, and element e of a
32-element chunk sits in bit e of its word (LSB first). Layout `[planes, N, Kp/32]`, contiguous, plane-major.

In memory a plane word is a `torch.int32` holding the uint32 bit pattern (torch does little arithmetic
on uint32); on disk it is written as uint32 through `.view(torch.uint32)` — the same bytes.

Per row and group a layer also stores its scale and zero point. Version 3 stores them lean: the scale as
float16 when every scale of the layer is a float16 value (the quantizer's default, `scale_dtype`), else
float32; the zero points bit-packed at `planes` bits each; the per-group code sums are recomputed from the
planes when read. Versions 1 and 2 stored float32 scales, float32 zero points and int32 code sums; they
are still read.

This module is pure tensor code: it knows nothing of files or training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from abqcli.btc.contract import K_ALIGN, MAX_PLANES, WORD_BITS
from abqcli.errors import InputError
from abqcli.quant.quantizer import CentredWeight, QuantizedWeight, WeightQuantSpec, qmax_for

# 2: a module may name the online transform before its activation quantizer; 3: float16 scales,
# bit-packed zero points, no stored code sums
FORMAT_VERSION = 5  # 4: the tensors may be sharded (model.safetensors.index.json); 5: act_clip per layer
LEAN_VERSION = 3  # the first version with the lean tensors

_SUFFIXES = {
    "planes": ".btc_planes",
    "scales": ".btc_scales",
    "zeros": ".btc_zeros",
    "code_sums": ".btc_code_sums",  # versions 1 and 2 only
}
META_KEYS = ("bits", "balance", "group_size", "in_features", "out_features")


def num_planes(qmax: int) -> int:
    """Bit planes needed for codes in [0, qmax] (W2*: qmax 4 -> 3 planes)."""
    if qmax < 1:
        raise ValueError(f"qmax must be >= 1, got {qmax}")
    return int(qmax).bit_length()


def padded_k(k: int) -> int:
    """K rounded up to a multiple of K_ALIGN (the padding holds code 0)."""
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    return -(-k // K_ALIGN) * K_ALIGN


def _codes_numpy(codes: torch.Tensor, qmax: int) -> np.ndarray:
    """Validate codes [R, K] and return them as a contiguous uint8 numpy array."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [R, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if num_planes(qmax) > MAX_PLANES:
        raise ValueError(f"qmax {qmax} needs more than {MAX_PLANES} planes")
    codes = codes.detach().cpu()
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > qmax:
            raise ValueError(f"codes must lie in [0, {qmax}], found [{lo}, {hi}]")
    return np.ascontiguousarray(codes.to(torch.uint8).numpy())


def pack_planes(codes: torch.Tensor, qmax: int) -> torch.Tensor:
    """Pack codes [R, K] into bit planes [num_planes(qmax), R, padded_k(K)/32], dtype int32.

    Each int32 holds a uint32 bit pattern; element e of each 32-column chunk is bit e. Columns past K
    are code 0, so every padding bit is 0. Codes outside [0, qmax] raise ValueError.
    """
    c = _codes_numpy(codes, qmax)
    r, k = c.shape
    kp = padded_k(k)
    if kp != k:
        c = np.concatenate([c, np.zeros((r, kp - k), dtype=np.uint8)], axis=1)
    planes = np.empty((num_planes(qmax), r, kp // WORD_BITS), dtype=np.int32)
    for p in range(planes.shape[0]):
        # packbits treats any non-zero as a 1; little bit order puts column 8b+i in bit i of byte b,
        # and reading 4 bytes as a little-endian uint32 puts column 32w+e in bit e of word w.
        packed = np.packbits(np.bitwise_and(c, 1 << p), axis=1, bitorder="little")
        planes[p] = packed.view("<u4").astype(np.uint32, copy=False).view(np.int32)
    return torch.from_numpy(planes)


def checked_codes(planes: torch.Tensor, k: int, qmax: int) -> torch.Tensor:
    """The codes [R, k] of bit planes, refusing (ValueError) a non-zero padding bit and a code above
    qmax (W2*'s 3 planes can spell 5..7)."""
    kp = padded_k(k)
    padded = unpack_planes(planes, kp)
    if bool((padded[:, k:] != 0).any()):
        raise ValueError(f"non-zero padding bits in columns {k}..{kp - 1}")
    codes = padded[:, :k]
    if int(codes.max()) > qmax:
        raise ValueError(f"codes up to {int(codes.max())}, above qmax {qmax}")
    return codes


def _planes_numpy(planes: torch.Tensor) -> np.ndarray:
    if planes.dim() != 3:
        raise ValueError(f"planes must be 3-D [P, R, Kw], got shape {tuple(planes.shape)}")
    if planes.dtype == torch.uint32:
        planes = planes.view(torch.int32)
    if planes.dtype != torch.int32:
        raise ValueError(f"planes must be int32 (or uint32), got {planes.dtype}")
    if planes.shape[0] > MAX_PLANES:
        raise ValueError(f"at most {MAX_PLANES} planes, got {planes.shape[0]}")
    return np.ascontiguousarray(planes.detach().cpu().numpy())


def unpack_planes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_planes`: planes [P, R, Kw] -> uint8 codes [R, k] (padding dropped)."""
    p_np = _planes_numpy(planes)
    n_planes, r, kw = p_np.shape
    if not 0 < k <= kw * WORD_BITS:
        raise ValueError(f"k={k} does not fit in {kw} words of {WORD_BITS} bits")
    codes = np.zeros((r, k), dtype=np.uint8)
    for p in range(n_planes):
        as_bytes = p_np[p].view(np.uint32).astype("<u4", copy=False).view(np.uint8)
        bits = np.unpackbits(as_bytes, axis=1, count=k, bitorder="little")
        codes |= bits << np.uint8(p)
    return torch.from_numpy(codes)


def group_code_sums(codes: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Sum of codes over each group of the real K columns: [R, K] -> int32 [R, G].

    `group_size` None means one group of all K columns; the last group may be partial.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [R, K], got shape {tuple(codes.shape)}")
    r, k = codes.shape
    g = group_size or k
    if g < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n_groups = -(-k // g)
    c = codes.to(torch.int32)
    pad = n_groups * g - k
    if pad:
        c = torch.cat([c, c.new_zeros(r, pad)], dim=1)
    return c.reshape(r, n_groups, g).sum(dim=-1, dtype=torch.int32)


@dataclass(eq=False)
class PackedWeight:
    """One quantized linear in BTC form.

    planes: int32 [P, N, Kw] (uint32 bit patterns); scale, zero: float32 [N, G] (zero holds integers);
    code_sums: int32 [N, G], the sum of the weight codes of each row over each group's real columns.
    """

    planes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    code_sums: torch.Tensor
    in_features: int
    out_features: int
    bits: int
    balance: bool
    group_size: int | None
    _centred: CentredWeight | None = field(default=None, init=False, repr=False)
    _dequant_f32: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.planes.dtype == torch.uint32:
            self.planes = self.planes.view(torch.int32)
        qmax = self.qmax  # validates bits / balance
        n, k = self.out_features, self.in_features
        expected = {
            "planes": ((num_planes(qmax), n, padded_k(k) // WORD_BITS), torch.int32),
            "scale": ((n, self.num_groups), torch.float32),
            "zero": ((n, self.num_groups), torch.float32),
            "code_sums": ((n, self.num_groups), torch.int32),
        }
        for attr, (shape, dtype) in expected.items():
            t = getattr(self, attr)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{attr}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")

    @property
    def qmax(self) -> int:
        return qmax_for(self.bits, self.balance)

    @property
    def num_groups(self) -> int:
        g = self.group_size or self.in_features
        return -(-self.in_features // g)

    @property
    def spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.bits, self.group_size, self.balance)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> PackedWeight:
        n, k = qw.codes.shape
        spec = qw.spec
        return cls(
            planes=pack_planes(qw.codes, spec.qmax),
            scale=qw.scale.detach().float().contiguous(),
            zero=qw.zero.detach().float().contiguous(),
            code_sums=group_code_sums(qw.codes, spec.group_size),
            in_features=k,
            out_features=n,
            bits=spec.bits,
            balance=spec.balance,
            group_size=spec.group_size,
        )

    def check_content(self) -> None:
        """What a reader of stored code sums (versions 1-2) must refuse (docs/FORMAT.md §7), as
        ValueError: what `checked_codes` and `check_qparams` refuse, and code sums that are not the sums
        of the stored codes."""
        codes = checked_codes(self.planes, self.in_features, self.qmax)
        if not torch.equal(group_code_sums(codes, self.group_size), self.code_sums):
            raise ValueError("code_sums are not the sums of the stored codes")
        self.check_qparams()

    def check_qparams(self) -> None:
        """Zero points that are not integers in [0, qmax] and scales that are not finite and positive
        are a ValueError (what a reader refuses; the writer checks it before writing)."""
        zero = self.zero
        if not bool((zero == zero.round()).all()) or float(zero.min()) < 0 or float(zero.max()) > self.qmax:
            raise ValueError(f"zero points must be integers in [0, {self.qmax}]")
        if not bool(torch.isfinite(self.scale).all()) or float(self.scale.min()) <= 0:
            raise ValueError("scales must be finite and positive")

    def codes(self) -> torch.Tensor:
        """Unpacked weight codes, uint8 [N, K]."""
        return unpack_planes(self.planes, self.in_features)

    def to_quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes(), self.scale.clone(), self.zero.clone(), self.spec)

    def centred_weight(self) -> CentredWeight:
        """`codes − zero` per row and group (exact integers in float32) with the scales, cached: the
        operand of the CPU GEMM backend (`abqcli.quant.integer.integer_linear`), whose matmul with
        centred activation codes is the epilogue's bracket."""
        if self._centred is None:
            self._centred = self.to_quantized().centred()
        return self._centred

    def dequantized_f32(self) -> torch.Tensor:
        """Dequantized weight float32 [N, K], cached (the weight-only path)."""
        if self._dequant_f32 is None:
            self._dequant_f32 = self.to_quantized().dequantize()
        return self._dequant_f32


def tensor_names(linear_name: str, version: int = FORMAT_VERSION) -> dict[str, str]:
    """Names of the BTC tensors of one linear in a file of `version`: keys planes, scales, zeros and
    (versions 1 and 2) code_sums."""
    return {key: linear_name + suffix for key, suffix in _SUFFIXES.items()
            if key != "code_sums" or version < LEAN_VERSION}


BTC_SUFFIXES = tuple(_SUFFIXES.values())  # every suffix any version uses


def pack_zero_points(zero: torch.Tensor, width: int) -> torch.Tensor:
    """Zero points [N, G] (integers in [0, 2**width)) as a little-endian bit stream, uint8
    [ceil(N·G·width / 8)]: value i (row-major) occupies bits i·width … i·width + width − 1, least
    significant bit first; bits past the last value are 0."""
    z = zero.detach().cpu().reshape(-1).to(torch.int64).numpy()
    if z.size and (z.min() < 0 or z.max() >= 1 << width):
        raise ValueError(f"zero points must lie in [0, {(1 << width) - 1}] to pack at {width} bits")
    bits = (z[:, None] >> np.arange(width)) & 1
    return torch.from_numpy(np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little"))


def unpack_zero_points(stream: torch.Tensor, rows: int, groups: int, width: int) -> torch.Tensor:
    """Inverse of `pack_zero_points`: float32 [rows, groups]. A stream of the wrong length, or with a
    non-zero bit after the last value, is a ValueError."""
    count = rows * groups * width
    if stream.dtype != torch.uint8 or stream.dim() != 1 or stream.numel() != -(-count // 8):
        raise ValueError(f"zero points: expected uint8 [{-(-count // 8)}] ({rows}x{groups} values of {width} "
                         f"bits), got {stream.dtype} {list(stream.shape)}")
    bits = np.unpackbits(stream.cpu().numpy(), bitorder="little")
    if bits[count:].any():
        raise ValueError("non-zero padding bits after the last zero point")
    values = bits[:count].reshape(-1, width).astype(np.int64) @ (1 << np.arange(width))
    return torch.from_numpy(values.reshape(rows, groups).astype(np.float32))


def _stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scales as written: float16 when that is exact for every one of them, else float32."""
    half = scale.half()
    return half if torch.equal(half.float(), scale) else scale


def packed_weight_meta(pw: PackedWeight) -> dict:
    """The per-layer metadata that `packed_weight_from_tensors` needs."""
    return {
        "bits": pw.bits,
        "balance": pw.balance,
        "group_size": pw.group_size,
        "in_features": pw.in_features,
        "out_features": pw.out_features,
    }


def packed_weight_to_tensors(name: str, pw: PackedWeight) -> dict[str, torch.Tensor]:
    """The tensors written for one linear (version 3): planes as a torch.uint32 view (same bytes),
    scales float16 where exact (else float32), zero points bit-packed at `planes` bits."""
    names = tensor_names(name)
    return {
        names["planes"]: pw.planes.contiguous().view(torch.uint32),
        names["scales"]: _stored_scale(pw.scale.contiguous()),
        names["zeros"]: pack_zero_points(pw.zero, pw.planes.shape[0]),
    }


def _read_lean(name: str, tensors: Mapping[str, torch.Tensor], planes: torch.Tensor, n: int, k: int,
               qmax: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale float32, zero float32, code sums) of a version-3 linear; the sums from the planes, whose
    codes are checked on the way (`checked_codes`)."""
    names = tensor_names(name)
    scale = tensors[names["scales"]]
    if scale.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"scales must be float16 or float32, got {scale.dtype}")
    groups = WeightQuantSpec(1, group_size).num_groups(k)
    zero = unpack_zero_points(tensors[names["zeros"]], n, groups, num_planes(qmax))
    sums = group_code_sums(checked_codes(planes, k, qmax), group_size)
    return scale.float(), zero, sums


def packed_weight_from_tensors(name: str, tensors: Mapping[str, torch.Tensor], meta: dict,
                               version: int = FORMAT_VERSION) -> PackedWeight:
    """Rebuild one linear from its tensors (of a file of `version`) and metadata; anything missing or
    malformed -> InputError."""
    names = tensor_names(name, version)
    missing = [n for n in names.values() if n not in tensors]
    if missing:
        raise InputError(f"BTC tensor missing: {', '.join(missing)}")
    missing_meta = [key for key in META_KEYS if key not in meta]
    if missing_meta:
        raise InputError(f"{name}: BTC metadata missing: {', '.join(missing_meta)}")
    planes = tensors[names["planes"]]
    if planes.dtype not in (torch.uint32, torch.int32):
        raise InputError(f"{names['planes']}: expected uint32, got {planes.dtype}")
    try:
        group_size = None if meta["group_size"] is None else int(meta["group_size"])
        n, k, bits, balance = int(meta["out_features"]), int(meta["in_features"]), int(meta["bits"]), bool(meta["balance"])
        planes = planes.view(torch.int32)
        lean = version >= LEAN_VERSION
        if lean:
            scale, zero, sums = _read_lean(name, tensors, planes, n, k, qmax_for(bits, balance), group_size)
        else:
            scale, zero, sums = (tensors[names[key]] for key in ("scales", "zeros", "code_sums"))
        pw = PackedWeight(planes=planes, scale=scale, zero=zero, code_sums=sums, in_features=k,
                          out_features=n, bits=bits, balance=balance, group_size=group_size)
        if lean:  # the codes were checked while their sums were computed
            pw.check_qparams()
        else:
            pw.check_content()
        return pw
    except ValueError as exc:
        raise InputError(f"{name}: bad BTC tensors: {exc}") from exc
