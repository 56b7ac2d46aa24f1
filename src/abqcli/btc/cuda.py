"""CuPy backend of the BTC GEMM: loads `cuda/*.cu` with `cupy.RawModule`, launches, checks the arch.

Entry points (CUDA C in `cuda/`, see the comments there for the fragment layouts):

* `btc_pack.cu`  `btc_quant_pack_{f32,f16}`: per-token activation quantization + bit-plane packing.
* `btc_gemm.cu`  `btc_mma_{acc,f32,f16}_{k256,k128}_m{MT}n{NT}`: the binary tensor-core GEMM
  (`mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc`, sm_80+), returning the int32
  accumulators [M, N, G] (`acc`) or the float output with the fused affine epilogue (`f32`, `f16`);
  `btc_popc_acc`: the plain `__popc` GEMM (no tensor cores), a second opinion;
  `btc_epilogue_{f32,f16}`: accumulators -> float output.

Group handling: k256 steps when the group is a multiple of 256 columns or the weight is per-channel (a
row whose padded K is an odd multiple of 128 ends with a half step whose upper words load as zeros);
a group that is an odd multiple of 128 columns (128, 384, ...) runs the m16n8k128 variant, one or more
whole k128 steps per group.

The index arithmetic shared with the kernels (tile sizes, per-warp token/channel counts, grid, shared
memory) lives in `launch_geometry`; tests/test_cuda_indexing.py emulates the kernels with it on the CPU.
Without CuPy or a GPU every launching function raises `InputError` with a one-line reason.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import abqcli
from abqcli.btc.contract import K_ALIGN, MAX_PLANES, WORD_BITS, check_btc_group, check_int32_bound
from abqcli.btc.format import PackedWeight, num_planes, padded_k
from abqcli.errors import InputError
from abqcli.quant.quantizer import FP_BITS, qmax_for

NEEDS_GPU = "--backend cupy needs a CUDA GPU and CuPy (pip install 'abqcli[cuda]'); use --backend cpu"
MIN_ARCH = 80  # mma .b1 with .and.popc exists from sm_80 on

# Kernel constants (mirrored by the #defines in cuda/btc_gemm.cu).
WARP = 32
MMA_M = 16  # rows of one mma tile: stacked (activation plane, token) pairs
MMA_N = 8  # columns of one mma tile: stacked (weight plane, channel) pairs
K256_WORDS = 8  # 32-bit words per m16n8k256 step
K128_WORDS = 4  # 32-bit words per m16n8k128 step (= K_ALIGN / WORD_BITS: the contract's alignment)

# (MT, NT): m16 tiles x n8 tiles per warp, the variants compiled in btc_gemm.cu.
TILE_CONFIGS: tuple[tuple[int, int], ...] = ((1, 2), (1, 4), (2, 4))
WARPS_PER_BLOCK = 4
SMEM_LIMIT = 48 * 1024  # default dynamic shared memory limit per block
PACK_THREADS = 256
POPC_THREADS = 128
EPILOGUE_THREADS = 256

SOURCES = ("btc_pack.cu", "btc_gemm.cu")


# ------------------------------------------------------------------------------------------ geometry


def pick_tile(pa: int, m: int, pw: int, n: int) -> tuple[int, int]:
    """Tile configuration (MT, NT) for a shape, from a small table keyed by the stacked row count.

    pa*m <= 16 (a GEMV-like batch: planes of all tokens fit one m16 tile): (1, 2), many narrow warps;
    pa*m <= 64: (1, 4); larger: (2, 4), more register reuse per loaded fragment.
    """
    rows = pa * m
    if rows <= MMA_M:
        return (1, 2)
    if rows <= 4 * MMA_M:
        return (1, 4)
    return (2, 4)


def k_words_per_step(kw: int, gw: int, groups: int) -> int:
    """8 (m16n8k256) unless groups are odd multiples of 128 columns, then 4 (m16n8k128)."""
    if groups == 1 or gw % K256_WORDS == 0:
        return K256_WORDS
    return K128_WORDS


@dataclass(frozen=True)
class Geometry:
    """Launch geometry of one mma GEMM; every expression here is repeated literally in the kernel."""

    mt: int
    nt: int
    kwords: int
    mc: int  # tokens per warp  = (16*MT) // pa
    nc: int  # channels per warp = (8*NT) // pw
    warps: int  # warps per block
    grid: tuple[int, int, int]  # (token chunks, channel-chunk blocks, 1)
    block: tuple[int, int, int]
    smem_per_warp: int
    smem: int

    @property
    def s_row(self) -> int:  # SROW in the kernel: row stride of the shared popcount tile
        return MMA_N * self.nt + 1

    @property
    def kernel_suffix(self) -> str:
        return f"k{self.kwords * WORD_BITS}_m{self.mt}n{self.nt}"


def launch_geometry(
    pa: int,
    m: int,
    pw: int,
    n: int,
    kw: int,
    gw: int,
    groups: int,
    float_out: bool,
    tile: tuple[int, int] | None = None,
) -> Geometry:
    mt, nt = tile or pick_tile(pa, m, pw, n)
    if (mt, nt) not in TILE_CONFIGS:
        raise ValueError(f"tile {(mt, nt)} is not compiled (have {TILE_CONFIGS})")
    if not (1 <= pa <= MAX_PLANES and 1 <= pw <= MAX_PLANES):
        raise ValueError(f"1..{MAX_PLANES} planes supported, got pa={pa}, pw={pw}")
    if kw % K128_WORDS or gw % K128_WORDS:
        raise ValueError(f"words per row ({kw}) and per group ({gw}) must be multiples of {K128_WORDS}")
    mc = (MMA_M * mt) // pa
    nc = (MMA_N * nt) // pw
    s_bytes = 4 * MMA_M * mt * (MMA_N * nt + 1)
    per_warp = s_bytes + (8 * mc * nc if float_out else 0)
    warps = max(1, min(WARPS_PER_BLOCK, SMEM_LIMIT // per_warp))
    n_chunks = -(-n // nc)
    grid = (-(-m // mc), -(-n_chunks // warps), 1)
    return Geometry(
        mt=mt,
        nt=nt,
        kwords=k_words_per_step(kw, gw, groups),
        mc=mc,
        nc=nc,
        warps=warps,
        grid=grid,
        block=(WARP * warps, 1, 1),
        smem_per_warp=per_warp,
        smem=per_warp * warps,
    )


def group_layout(kw: int, k: int, group_size: int | None) -> tuple[int, int]:
    """(gw, groups): words per group and group count; per-channel is one group of all kw words."""
    if group_size is None:
        return kw, 1
    if group_size % K_ALIGN:
        raise ValueError(f"group_size {group_size} is not a multiple of {K_ALIGN}")
    return group_size // WORD_BITS, -(-k // group_size)


# ------------------------------------------------------------------------------------- availability


def cuda_source_dir() -> Path:
    """`abqcli/_cuda` in a wheel install, else `<repo>/cuda` (editable install / source tree)."""
    packaged = Path(abqcli.__file__).parent / "_cuda"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "cuda"


def _import_cupy():
    import cupy

    return cupy


def available() -> tuple[bool, str]:
    """(True, device description) when CuPy imports and an sm_80+ GPU is visible, else (False, reason)."""
    try:
        cp = _import_cupy()
    except Exception as exc:  # noqa: BLE001  (ImportError, or a CUDA library that fails to load)
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc})".splitlines()[0]
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001  (CUDARuntimeError when no driver/device)
        return False, f"no CUDA device visible ({type(exc).__name__})"
    if count < 1:
        return False, "no CUDA device visible"
    try:
        arch = int(cp.cuda.Device().compute_capability)
    except Exception as exc:  # noqa: BLE001
        return False, f"cannot query the CUDA device ({type(exc).__name__})"
    if arch < MIN_ARCH:
        return False, f"the GPU is sm_{arch}; the BTC kernels need sm_{MIN_ARCH} or newer"
    return True, f"sm_{arch}, {count} device(s)"


_READY = False  # set once available() has said yes (it is not asked again on every launch)


def _require():
    global _READY
    if not _READY:
        ok, reason = available()
        if not ok:
            if reason.startswith("the GPU is sm_"):
                raise InputError(f"--backend cupy: {reason}; use --backend cpu")
            raise InputError(NEEDS_GPU)
        _READY = True
    return _import_cupy()


# ------------------------------------------------------------------------------------------ modules

_MODULES: dict[tuple[str, int], Any] = {}
_FUNCTIONS: dict[tuple[str, int, str], Any] = {}


def _function(source: str, name: str):
    """Kernel `name` from `cuda/<source>`, compiled once per (source, arch) (CuPy also caches on disk)."""
    cp = _import_cupy()
    arch = int(cp.cuda.Device().compute_capability)
    fkey = (source, arch, name)
    fn = _FUNCTIONS.get(fkey)
    if fn is None:
        mkey = (source, arch)
        mod = _MODULES.get(mkey)
        if mod is None:
            code = (cuda_source_dir() / source).read_text()
            # CuPy appends its own -arch for the current device (NVRTC takes the last one); should a
            # CuPy/NVRTC pair refuse the explicit target, compile with the language level alone.
            try:
                mod = cp.RawModule(code=code, options=("-std=c++17", f"--gpu-architecture=sm_{arch}"))
                mod.get_function(name)  # RawModule compiles lazily: force it here
            except Exception:  # noqa: BLE001  (retry without the explicit target)
                mod = cp.RawModule(code=code, options=("-std=c++17",))
            _MODULES[mkey] = mod
        fn = mod.get_function(name)
        _FUNCTIONS[fkey] = fn
    return fn


class _OnTorchStream:
    """Run CuPy launches on the device and current stream of a torch CUDA tensor."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        cp = _import_cupy()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._dev = cp.cuda.Device(index)
        self._dev.__enter__()
        self._stream = cp.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream)
        self._stream.__enter__()
        return self

    def __exit__(self, *exc):
        self._stream.__exit__(*exc)
        self._dev.__exit__(*exc)
        return False


def _cuda_device(*tensors: torch.Tensor) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return t.device
    return torch.device("cuda", torch.cuda.current_device())


def _on(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Contiguous copy/view of t on device (16-byte aligned, as the uint2 loads need)."""
    t = t.to(device=device, dtype=dtype or t.dtype).contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _cp(t: torch.Tensor):
    """CuPy view of a contiguous CUDA tensor (shared memory)."""
    return _import_cupy().asarray(t)


def _words(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.dtype == torch.uint32:
        t = t.view(torch.int32)
    if t.dtype != torch.int32:
        raise ValueError(f"planes must be int32 (or uint32), got {t.dtype}")
    return _on(t, device)


# ---------------------------------------------------------------------------------------- launchers


def _launch_acc(a: torch.Tensor, w: torch.Tensor, gw: int, groups: int, kernel: str) -> torch.Tensor:
    cp = _import_cupy()
    pa, m, kw = a.shape
    pw, n, _ = w.shape
    acc = torch.empty((m, n, groups), dtype=torch.int32, device=a.device)
    if acc.numel() == 0:
        return acc
    args_head = (
        _cp(a),
        cp.int32(pa),
        cp.int32(m),
        _cp(w),
        cp.int32(pw),
        cp.int32(n),
        cp.int32(kw),
        cp.int32(gw),
        cp.int32(groups),
        _cp(acc),
    )
    if kernel == "popc":
        fn = _function("btc_gemm.cu", "btc_popc_acc")
        fn((m, -(-n // POPC_THREADS), 1), (POPC_THREADS, 1, 1), args_head)
    elif kernel == "mma":
        geo = launch_geometry(pa, m, pw, n, kw, gw, groups, float_out=False)
        fn = _function("btc_gemm.cu", f"btc_mma_acc_{geo.kernel_suffix}")
        fn(geo.grid, geo.block, args_head, shared_mem=geo.smem)
    else:
        raise ValueError(f"unknown kernel {kernel!r} (expected 'mma' or 'popc')")
    return acc


def int_gemm_planes(
    a_planes: torch.Tensor, w_planes: torch.Tensor, group_words: int | None, kernel: str = "mma"
) -> torch.Tensor:
    """Raw int32 accumulators [M, N, G] of the bit-plane GEMM on the GPU (for bit-exact tests).

    a_planes int32 [Pa, M, Kw], w_planes int32 [Pw, N, Kw]; group_words None = one group of all Kw
    words, else words per group (a multiple of 4; the last group may be partial). kernel "mma" (binary
    tensor cores) or "popc" (plain popcount). Returns int32 on a_planes' device (CPU inputs are
    computed on the current GPU and copied back).
    """
    _require()
    if a_planes.dim() != 3 or w_planes.dim() != 3 or a_planes.shape[2] != w_planes.shape[2]:
        raise ValueError(f"planes shapes {list(a_planes.shape)} and {list(w_planes.shape)} do not match")
    kw = a_planes.shape[2]
    gw = group_words or kw
    groups = -(-kw // gw)
    device = _cuda_device(a_planes, w_planes)
    with torch.cuda.device(device), _OnTorchStream(device):
        acc = _launch_acc(_words(a_planes, device), _words(w_planes, device), gw, groups, kernel)
    return acc if a_planes.is_cuda else acc.cpu()


def _quant_pack(x: torch.Tensor, bits: int, k: int, gw: int, groups: int, clip: float):
    """x contiguous fp32/fp16 [M, K] on the GPU -> (planes, scale, zero, sums) on the same device
    (per-token ranges scaled by the clip ratio `clip`)."""
    cp = _import_cupy()
    m = x.shape[0]
    qmax = qmax_for(bits)
    pa = num_planes(qmax)
    kw = padded_k(k) // WORD_BITS
    dev = x.device
    planes = torch.empty((pa, m, kw), dtype=torch.int32, device=dev)
    scale = torch.empty((m,), dtype=torch.float32, device=dev)
    zero = torch.empty((m,), dtype=torch.float32, device=dev)
    sums = torch.empty((m, groups), dtype=torch.int32, device=dev)
    if m == 0:
        return planes, scale, zero, sums
    name = "btc_quant_pack_f16" if x.dtype == torch.float16 else "btc_quant_pack_f32"
    fn = _function("btc_pack.cu", name)
    fn(
        (m, 1, 1),
        (PACK_THREADS, 1, 1),
        (
            _cp(x),
            cp.int32(m),
            cp.int32(k),
            cp.int32(qmax),
            cp.float32(clip),
            cp.int32(pa),
            cp.int32(kw),
            cp.int32(gw),
            cp.int32(groups),
            _cp(planes),
            _cp(scale),
            _cp(zero),
            _cp(sums),
        ),
        shared_mem=4 * groups,
    )
    return planes, scale, zero, sums


def quantize_pack_activations(x: torch.Tensor, bits: int, group_size: int | None = None, clip: float = 1.0):
    """Per-token quantization (clip ratio `clip`) + bit-plane packing of x [M, K] (fp32, or fp16; others
    go through fp32).

    Returns (planes int32 [Pa, M, Kp/32], scale f32 [M], zero f32 [M], sums int32 [M, G]) on x's device,
    bit for bit `pack_planes(quantize_activation(x, bits, clip))` with `group_code_sums(codes, group_size)`.
    """
    _require()
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {list(x.shape)}")
    k = x.shape[1]
    kw = padded_k(k) // WORD_BITS
    gw, groups = group_layout(kw, k, group_size)
    device = _cuda_device(x)
    dtype = torch.float16 if x.dtype == torch.float16 else torch.float32
    with torch.cuda.device(device), _OnTorchStream(device):
        out = _quant_pack(_on(x.detach(), device, dtype), bits, k, gw, groups, clip)
    return out if x.is_cuda else tuple(t.cpu() for t in out)


# ------------------------------------------------------------------------------------- linear layer


@dataclass
class _DeviceWeight:
    planes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    code_sums: torch.Tensor
    source_ptr: int


_WEIGHTS: dict[tuple[int, str], _DeviceWeight] = {}


def _device_weight(w: PackedWeight, device: torch.device) -> _DeviceWeight:
    """The weight's tensors on `device`, copied once and cached while the PackedWeight lives."""
    key = (id(w), str(device))
    cached = _WEIGHTS.get(key)
    if cached is not None and cached.source_ptr == w.planes.data_ptr():
        return cached
    dw = _DeviceWeight(
        planes=_words(w.planes, device),
        scale=_on(w.scale, device, torch.float32),
        zero=_on(w.zero, device, torch.float32),
        code_sums=_on(w.code_sums, device, torch.int32),
        source_ptr=w.planes.data_ptr(),
    )
    if cached is None:
        weakref.finalize(w, _WEIGHTS.pop, key, None)
    _WEIGHTS[key] = dw
    return dw


def btc_linear(
    x: torch.Tensor, w: PackedWeight, act_bits: int, bias: torch.Tensor | None = None, kernel: str = "mma",
    act_clip: float = 1.0,
) -> torch.Tensor:
    """The packed linear layer on the GPU: x [..., K] -> [..., N] in x's dtype, on x's device.

    Same contract as the `cpu` GEMM backend (`abqcli.btc.backends.GemmBackend.linear`): per-token
    activation quantization (bit for bit), exact integer GEMM, affine epilogue (+ bias); act_bits >= 16 is
    the weight-only path (dequantized weight, float matmul). kernel "mma" fuses the epilogue into the
    tensor-core GEMM; "popc" runs the popcount GEMM and the stand-alone epilogue kernel.
    """
    _require()
    if x.shape[-1] != w.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {w.in_features}")
    device = _cuda_device(x)
    if act_bits >= FP_BITS:
        weight = w.dequantized_f32().to(device=device, dtype=x.dtype)
        b = None if bias is None else bias.to(device=device, dtype=x.dtype)
        return torch.nn.functional.linear(x.to(device), weight, b).to(x.device)
    check_btc_group(w.group_size)
    check_int32_bound(w.in_features, qmax_for(act_bits), w.qmax)
    half = x.dtype == torch.float16
    with torch.cuda.device(device), _OnTorchStream(device):
        x2 = _on(x.detach().reshape(-1, w.in_features), device, torch.float16 if half else torch.float32)
        y = torch.empty((x2.shape[0], w.out_features), dtype=x2.dtype, device=device)
        if x2.shape[0]:
            _launch_linear(x2, w, act_bits, bias, y, kernel, act_clip)
    y = y.reshape(*x.shape[:-1], w.out_features)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.to(x.device)


def _launch_linear(
    x2: torch.Tensor, w: PackedWeight, act_bits: int, bias: torch.Tensor | None, y: torch.Tensor, kernel: str,
    act_clip: float,
) -> None:
    """Quantize + pack x2 [M, K] (fp32/fp16 on the GPU), then the GEMM and epilogue into y [M, N]."""
    cp = _import_cupy()
    device, (m, k), n = x2.device, x2.shape, w.out_features
    dw = _device_weight(w, device)
    pw, _, kw = dw.planes.shape
    gw, groups = group_layout(kw, k, w.group_size)
    a_planes, a_scale, a_zero, a_sums = _quant_pack(x2, act_bits, k, gw, groups, act_clip)
    pa = a_planes.shape[0]
    has_bias = bias is not None
    b = _on(bias, device, torch.float32) if has_bias else a_scale  # any float array as a stand-in
    epi = (
        _cp(a_scale),
        _cp(a_zero),
        _cp(a_sums),
        _cp(dw.scale),
        _cp(dw.zero),
        _cp(dw.code_sums),
        _cp(b),
        cp.int32(int(has_bias)),
        cp.int32(k),
        cp.int32(w.group_size or k),
        _cp(y),
    )
    out_kind = "f16" if y.dtype == torch.float16 else "f32"
    if kernel == "mma":
        geo = launch_geometry(pa, m, pw, n, kw, gw, groups, float_out=True)
        fn = _function("btc_gemm.cu", f"btc_mma_{out_kind}_{geo.kernel_suffix}")
        head = (
            _cp(a_planes),
            cp.int32(pa),
            cp.int32(m),
            _cp(dw.planes),
            cp.int32(pw),
            cp.int32(n),
            cp.int32(kw),
            cp.int32(gw),
            cp.int32(groups),
        )
        fn(geo.grid, geo.block, head + epi, shared_mem=geo.smem)
    elif kernel == "popc":
        acc = _launch_acc(a_planes, dw.planes, gw, groups, "popc")
        fn = _function("btc_gemm.cu", f"btc_epilogue_{out_kind}")
        fn(
            (-(-(m * n) // EPILOGUE_THREADS), 1, 1),
            (EPILOGUE_THREADS, 1, 1),
            (_cp(acc), cp.int32(m), cp.int32(n), cp.int32(groups)) + epi,
        )
    else:
        raise ValueError(f"unknown kernel {kernel!r} (expected 'mma' or 'popc')")
