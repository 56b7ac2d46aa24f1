"""`abq verify` and `abq inspect`: prove that a packed export computes what the fake-quant model does.

`verify_export` loads the packed model and its fake-quant twin (same export, QuantLinear with the
dequantized weights and the integer state), runs the packed model on a real text window while forward
pre-hooks capture the input of every quantized linear, and checks, per layer,

* the integer GEMM of the packed path (bit-plane popcounts on the CPU, the CUDA kernel with
  `--backend cupy`) against the exact integer reference (`int_gemm` of the codes): must be identical;
* the float output of the runtime layer (and of the epilogue applied to the packed accumulators)
  against the float fake-quant formula `F.linear(fake_quantize_activation(x, a), W_dequantized)`:
  max relative difference `max|y − y_ref| / max|y_ref|` at most 1e-5;

A routed expert of a MoE model that no token of the windows chose gets the per-layer checks on seeded
Gaussian rows instead (`input: synthetic`, counted in `layers_synthetic_input`); any other layer that
never ran is a failure.

And end to end, against the twin (whose quantized linears compute in the integer domain, the packed
CPU runtime's arithmetic — see `QuantLinear`):

* logits, teacher-forced: the twin runs with every quantized linear fed the packed model's input to the
  same layer, so both see the same activation codes; max relative difference at most 1e-4 (fp32);
* free-running logits (each model on its own activations) and the perplexity of both models on
  `windows` windows, to the backend's own criteria (`GemmBackend.verify_criteria`): the CPU backend
  shares the twin's arithmetic, so free-running logits within 1e-4 and perplexities within 5e-5
  relative (the same to 4 significant digits); the CUDA epilogue rounds in its own order, so a value on
  a rounding tie of a downstream activation quantizer can move to the neighbouring code there, and that
  change is amplified by the following layers: with `--backend cupy` free-running logits are reported,
  and teacher-forced logits plus a gross-error guard (mean NLLs, log perplexities, within 1e-2
  relative) are the criteria.

`inspect_export` reports the storage of every packed layer and the totals, from the file header and
the metadata (nothing is unpacked).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from abqcli.btc.backends import GemmBackend, VerifyCriteria
from abqcli.errors import InputError

LAYER_FLOAT_TOL = 1e-5  # DESIGN §6: float output vs the fake-quant layer, fp32
LOGITS_TOL = 1e-4  # teacher-forced logits, fp32, every backend
DEFAULT_SEQLEN = 512
LAYER_ROWS = 64  # tokens per layer used for the integer and float checks
FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model reads every word of this sentence, "
    "and the quantized layers must compute exactly what the reference computes. "
)


@dataclass
class VerifyReport:
    """Outcome of `verify_export`; `ok` is False when any check failed (see `problems`)."""

    directory: str
    backend: str
    scheme: str
    text: str  # where the tokens came from
    text_note: str | None  # set when the dataset was unavailable and the fallback sentence was used
    seqlen: int
    windows: int
    layers: list[dict] = field(default_factory=list)
    layers_integer_checked: int = 0
    layers_integer_exact: int = 0
    layers_synthetic_input: int = 0  # experts no token of the windows was routed to
    layer_float_max_rel: float = 0.0
    layer_float_tol: float = LAYER_FLOAT_TOL
    logits_max_rel: float = 0.0  # teacher-forced
    logits_tol: float = LOGITS_TOL
    logits_max_rel_free_running: float = 0.0  # a criterion with the CPU backend, see the module docstring
    ppl_packed: float = float("nan")
    ppl_fakequant: float = float("nan")
    ppl_rel_diff: float = float("nan")
    ppl_rel_tol: float | None = None  # the backend's criteria (None: not one of them)
    nll_rel_diff: float = float("nan")  # |ln ppl_packed − ln ppl_fakequant| / ln ppl_fakequant
    nll_rel_tol: float | None = None
    problems: list[str] = field(default_factory=list)
    ok: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y − ref| / max |ref| (0 when both are all zero)."""
    y, ref = y.double(), ref.double()
    diff = float((y - ref).abs().max()) if y.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def _eval_windows(tokenizer, dataset: str, data_dir, seqlen: int, windows: int):
    """([n, seqlen] token windows, description, fallback note or None)."""
    from abqcli import data

    try:
        text = data.load_text(dataset, "test", data_dir)
        ids, _ = data.tokenize(tokenizer, text.text)
        return data.eval_segments(ids, seqlen, windows), f"{dataset} ({text.origin})", None
    except InputError as exc:
        note = f"dataset unavailable ({exc}); used a fixed fallback sentence instead"
    ids = tokenizer(FALLBACK_TEXT, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise InputError("the tokenizer produced no tokens for the fallback sentence")
    need = seqlen * windows
    ids = ids.repeat(-(-need // ids.numel()))[:need]
    return ids.reshape(windows, seqlen), "fallback sentence", note


def _sample_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1])
    if x.shape[0] > rows:
        x = x[torch.linspace(0, x.shape[0] - 1, rows).round().long()]
    return x.float().cpu().clone()


def _synthetic_rows(in_features: int, rows: int) -> torch.Tensor:
    """Seeded standard Gaussian rows [rows, in_features]: the input of a layer no window reached."""
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(in_features))


def _integer_check(x: torch.Tensor, pw, act_bits: int, act_clip: float,
                   gemm: GemmBackend) -> tuple[bool, torch.Tensor, tuple]:
    """(identical?, the backend's accumulators [M, N, G], activation qparams) for one layer: the backend's
    own activation quantize+pack step (where it has one) and its bit-plane GEMM against the reference."""
    from abqcli.btc.format import group_code_sums, pack_planes
    from abqcli.btc.gemm import int_gemm
    from abqcli.quant.quantizer import qmax_for, quantize_activation

    codes, scale, zero = quantize_activation(x, act_bits, act_clip)
    ref = int_gemm(codes, pw.codes(), pw.group_size)
    a_planes = pack_planes(codes, qmax_for(act_bits))
    group_words = pw.group_size // 32 if pw.group_size else None
    sums = group_code_sums(codes, pw.group_size)
    exact = True
    own = gemm.quantize_pack(x, act_bits, pw.group_size, act_clip)
    if own is not None:
        g_planes, g_scale, g_zero, g_sums = (t.cpu() for t in own)
        exact = (torch.equal(g_planes, a_planes) and torch.equal(g_sums, sums)
                 and torch.equal(g_scale, scale.reshape(-1)) and torch.equal(g_zero, zero.reshape(-1)))
    acc = gemm.int_gemm_planes(a_planes, pw.planes, group_words).cpu().long()
    return exact and torch.equal(acc, ref), acc, (scale, zero, sums)


def _check_layer(name: str, module, x: torch.Tensor, gemm: GemmBackend) -> dict:
    from abqcli.btc.gemm import epilogue
    from abqcli.quant.quantizer import FP_BITS, fake_quantize_activation

    pw, act_bits, act_clip = module.packed, module.act_bits, module.act_clip
    x = module.transform_input(x)  # what the activation quantizer sees (a rotated model's online transform)
    weight = pw.to_quantized().dequantize()
    y_ref = F.linear(fake_quantize_activation(x, act_bits, act_clip), weight)
    y = gemm.linear(x, pw, act_bits, None, act_clip).float().cpu()
    result = {
        "name": name,
        "bits": pw.bits,
        "balance": pw.balance,
        "act_bits": act_bits,
        "group_size": pw.group_size,
        "input_transform": module.input_transform,
        "planes": int(pw.planes.shape[0]),
        "rows": int(x.shape[0]),
        "float_max_rel": _max_rel(y, y_ref),
    }
    if act_bits >= FP_BITS:
        result.update(integer_exact=None, integer_check="n/a (weight-only layer: dequantized matmul)")
        return result
    exact, acc, (scale, zero, sums) = _integer_check(x, pw, act_bits, act_clip, gemm)
    y_epi = epilogue(acc, scale.reshape(-1), zero.reshape(-1), sums, pw)
    result.update(
        integer_exact=bool(exact),
        integer_check=f"{gemm.kernel} vs int_gemm of the codes",
        epilogue_max_rel=_max_rel(y_epi, y_ref),
    )
    result["float_max_rel"] = max(result["float_max_rel"], result["epilogue_max_rel"])
    return result


@torch.no_grad()
def teacher_forced_logits(packed: nn.Module, reference: nn.Module, ids: torch.Tensor):
    """(packed logits, reference logits, inputs): run `packed` on `ids` recording the input of every
    quantized linear (`BTCLinear`), then `reference` with each module of the same name fed that input
    instead of its own (forward pre-hooks). Both then see the same activation codes at every quantized
    linear, so their logits differ only by float rounding. `inputs[name]` lists the captured inputs
    in call order."""
    from abqcli.runtime import BTCLinear

    inputs: dict[str, list[torch.Tensor]] = {}
    ref_modules = dict(reference.named_modules())
    names = [name for name, m in packed.named_modules() if isinstance(m, BTCLinear)]
    missing = [name for name in names if name not in ref_modules]
    if missing:
        raise ValueError(f"the reference model has no module {missing[0]}")

    def record(name: str):
        def hook(module, args) -> None:
            inputs.setdefault(name, []).append(args[0].detach())

        return hook

    def replay(name: str):
        calls = iter(range(1 << 30))

        def hook(module, args):
            recorded = inputs.get(name, [])
            i = next(calls)
            if i < len(recorded):
                return (recorded[i].to(args[0].dtype), *args[1:])
            return None

        return hook

    hooks = [packed.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        logits_p = packed(ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
    hooks = [ref_modules[name].register_forward_pre_hook(replay(name)) for name in names]
    try:
        logits_r = reference(ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return logits_p, logits_r, inputs


@torch.no_grad()
def verify_export(directory, backend: str = "cpu", data_dir=None, dataset: str = "wikitext2", windows: int = 2,
                  seqlen: int | None = None, layer_rows: int = LAYER_ROWS,
                  on_status: Callable[[str], None] | None = None) -> VerifyReport:
    """Check a packed export layer by layer (integer exactness, float agreement) and end to end
    (logits, perplexity) against its fake-quant twin. Raises InputError for unusable input (including
    `backend="cupy"` without CuPy and a GPU, checked before anything is loaded); check failures are
    reported in the returned report (`ok` False, `problems`). `on_status(text)` tells each phase for
    progress display (loaded, each window, the layer checks), from when every input check has passed."""
    from abqcli.formats import describe_layers
    from abqcli.formats.abq_packed import PACKED, TWIN, build
    from abqcli.formats.manifest import resolve_output_dir
    from abqcli.runtime import BTCLinear, require_backend

    gemm = require_backend(backend)
    if windows < 1:
        raise InputError(f"windows must be at least 1, got {windows}")
    start = time.perf_counter()
    device = "cuda" if gemm.device == "cuda" and torch.cuda.is_available() else "cpu"
    path = resolve_output_dir(directory)
    model, tokenizer, export = build(path, "float32", device, backend, PACKED)
    twin, _, _ = build(path, "float32", device, "cpu", TWIN, verify=False)
    context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_SEQLEN
    seqlen = seqlen or min(DEFAULT_SEQLEN, context)
    if seqlen < 2 or seqlen > context:
        raise InputError(f"seqlen must be between 2 and the model's context ({context}), got {seqlen}")
    segments, text, note = _eval_windows(tokenizer, dataset, data_dir, seqlen, windows)

    criteria = gemm.verify_criteria
    report = VerifyReport(
        directory=str(path), backend=backend, scheme=describe_layers(export.modules, export.kv_bits),
        text=text, text_note=note, seqlen=seqlen, windows=int(segments.shape[0]),
        ppl_rel_tol=criteria.ppl_rel_tol, nll_rel_tol=criteria.nll_rel_tol,
    )
    linears = {name: m for name, m in model.named_modules() if isinstance(m, BTCLinear)}
    status = on_status or (lambda _: None)
    status(f"loaded {path} (packed, {backend} backend) and its fake-quant twin: comparing "
           f"{report.windows} windows of {seqlen} tokens")
    captured = _compare_windows(model, twin, segments, device, layer_rows, report, status)
    status(f"checking {len(linears)} quantized layers (integer GEMM, float output)")
    _check_layers(report, linears, captured, gemm)
    report.problems += _end_to_end_problems(report, criteria)
    report.ok = not report.problems
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _compare_windows(model: nn.Module, twin: nn.Module, segments: torch.Tensor, device: str, layer_rows: int,
                     report: VerifyReport, status: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """Logits and perplexity of the packed model and its twin on every window, into `report`; the first
    window also runs teacher-forced. Returns `layer_rows` captured input rows per quantized linear."""
    nll = {"packed": 0.0, "fakequant": 0.0}
    tokens = 0
    captured: dict[str, torch.Tensor] = {}
    for i, window in enumerate(segments):
        ids = window.unsqueeze(0).to(device)
        if i == 0:
            logits_p, logits_tf, inputs = teacher_forced_logits(model, twin, ids)
            report.logits_max_rel = _max_rel(logits_p[0].cpu(), logits_tf[0].cpu())
            captured = {name: _sample_rows(xs[0], layer_rows) for name, xs in inputs.items()}
            del inputs, logits_tf
            logits_p = logits_p[0]
        else:
            logits_p = model(ids).logits[0].float()
        logits_f = twin(ids).logits[0].float()
        report.logits_max_rel_free_running = max(report.logits_max_rel_free_running,
                                                 _max_rel(logits_p.cpu(), logits_f.cpu()))
        target = ids[0, 1:]
        nll["packed"] += F.cross_entropy(logits_p[:-1], target, reduction="sum").double().item()
        nll["fakequant"] += F.cross_entropy(logits_f[:-1], target, reduction="sum").double().item()
        tokens += target.numel()
        status(f"window {i + 1}/{len(segments)}: ppl {math.exp(nll['packed'] / tokens):.3f} packed, "
               f"{math.exp(nll['fakequant'] / tokens):.3f} fake-quant")
    report.ppl_packed = math.exp(nll["packed"] / tokens)
    report.ppl_fakequant = math.exp(nll["fakequant"] / tokens)
    report.ppl_rel_diff = abs(report.ppl_packed - report.ppl_fakequant) / report.ppl_fakequant
    report.nll_rel_diff = abs(nll["packed"] - nll["fakequant"]) / max(abs(nll["fakequant"]), 1e-30)
    return captured


def _check_layers(report: VerifyReport, linears: dict[str, nn.Module], captured: dict[str, torch.Tensor],
                  gemm: GemmBackend) -> None:
    """Per-layer integer and float checks of every quantized linear on its captured input (seeded
    Gaussian rows for an expert no token was routed to), into `report`."""
    from abqcli.models.experts import expert_index

    for name, module in linears.items():
        x, source = captured.get(name), "captured"
        if x is None and expert_index(name) is not None:
            x, source = _synthetic_rows(module.in_features, LAYER_ROWS), "synthetic"
            report.layers_synthetic_input += 1
        if x is None:
            report.problems.append(f"{name}: no input captured (the layer never ran)")
            continue
        report.layers.append({**_check_layer(name, module, x, gemm), "input": source})
    checked = [r for r in report.layers if r["integer_exact"] is not None]
    report.layers_integer_checked = len(checked)
    report.layers_integer_exact = sum(r["integer_exact"] for r in checked)
    report.layer_float_max_rel = max((r["float_max_rel"] for r in report.layers), default=0.0)
    for r in checked:
        if not r["integer_exact"]:
            report.problems.append(f"{r['name']}: integer GEMM differs from the exact reference")
    for r in report.layers:
        if not r["float_max_rel"] <= LAYER_FLOAT_TOL:
            report.problems.append(f"{r['name']}: float output differs from the fake-quant layer by "
                                   f"{r['float_max_rel']:.3g} relative (tolerance {LAYER_FLOAT_TOL:g})")


def _end_to_end_problems(r: VerifyReport, criteria: VerifyCriteria) -> list[str]:
    """The failed end-to-end checks: teacher-forced logits (every backend), then the backend's criteria."""
    problems = []
    if not r.logits_max_rel <= LOGITS_TOL:
        problems.append(f"teacher-forced logits differ from the fake-quant model by "
                        f"{r.logits_max_rel:.3g} relative (tolerance {LOGITS_TOL:g})")
    if not (math.isfinite(r.ppl_packed) and math.isfinite(r.ppl_fakequant)):
        return [*problems, "non-finite perplexity"]
    tol = criteria.free_running_logits_tol
    if tol is not None and not r.logits_max_rel_free_running <= tol:
        problems.append(f"free-running logits differ from the fake-quant model by "
                        f"{r.logits_max_rel_free_running:.3g} relative (tolerance {tol:g})")
    tol = criteria.ppl_rel_tol
    if tol is not None and not r.ppl_rel_diff <= tol:
        problems.append(f"perplexity {r.ppl_packed:.6g} (packed) vs {r.ppl_fakequant:.6g} (fake-quant) differ "
                        f"by {r.ppl_rel_diff:.3g} relative (tolerance {tol:g}: the same to "
                        f"{int(-math.log10(tol))} significant digits)")
    tol = criteria.nll_rel_tol
    if tol is not None and not r.nll_rel_diff <= tol:
        problems.append(f"perplexity {r.ppl_packed:.4g} (packed) vs {r.ppl_fakequant:.4g} (fake-quant): "
                        f"log perplexities differ by {r.nll_rel_diff:.3g} relative (tolerance {tol:g})")
    return problems


# ------------------------------------------------------------------------------------------ inspect


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _header(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, bytes) from a safetensors header, without reading the tensors."""
    out = {}
    try:
        with safe_open(path, "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensor = fh.get_slice(name)
                dtype, shape = tensor.get_dtype(), list(tensor.get_shape())
                out[name] = (dtype, shape, math.prod(shape) * _DTYPE_BYTES[dtype])
    except (OSError, SafetensorError, KeyError) as exc:
        raise InputError(f"cannot read the header of {path}: {exc}") from exc
    return out


_SCALE_DTYPE_NAMES = {"F16": "float16", "F32": "float32"}  # safetensors header dtype -> abq.json's name


def inspect_export(directory) -> dict:
    """Storage report of an abq-packed export, read from its safetensors header: per layer bits, planes,
    group size, scale dtype and bytes (planes, scales, zeros, and code sums in versions 1-2); per layer
    and in total the bits per weight over the real columns — of the codes, of the scale/zero overhead,
    and the cost of padding K to a multiple of 128 on its own (`abq_packed.storage_bits`) — the size
    against fp16 of the same layers, how many of the layers are MoE experts', and the file sizes."""
    from abqcli.btc.format import BTC_SUFFIXES, num_planes, tensor_names
    from abqcli.formats import describe_layers
    from abqcli.formats.abq_packed import packed_weight_files, read_packed_export, storage_bits
    from abqcli.formats.manifest import resolve_output_dir
    from abqcli.models.experts import expert_index
    from abqcli.quant.quantizer import qmax_for

    export = read_packed_export(resolve_output_dir(directory))
    weight_files = packed_weight_files(export.directory)
    header = {name: entry for file in weight_files for name, entry in _header(file).items()}
    layers = {}
    tot = {"weights": 0, "plane_bits": 0, "bytes": dict.fromkeys(tensor_names("", export.version), 0)}
    for name, meta in sorted(export.modules.items()):
        names = tensor_names(name, export.version)
        missing = [t for t in names.values() if t not in header]
        if missing:
            raise InputError(f"BTC tensor missing: {', '.join(missing)}")
        n, k = int(meta["out_features"]), int(meta["in_features"])
        sizes = {key: header[tname][2] for key, tname in names.items()}
        planes = header[names["planes"]][1][0]
        expected = num_planes(qmax_for(int(meta["bits"]), bool(meta.get("balance"))))
        if planes != expected:
            raise InputError(f"{names['planes']}: {planes} planes, the metadata implies {expected}")
        layers[name] = {
            "bits": int(meta["bits"]), "balance": bool(meta.get("balance")), "act_bits": meta.get("act_bits"),
            "input_transform": meta.get("input_transform"), "planes": planes,
            "group_size": meta.get("group_size"), "in_features": k, "out_features": n,
            "scale_dtype": _SCALE_DTYPE_NAMES.get(header[names["scales"]][0], header[names["scales"]][0]),
            **storage_bits(sizes, n * k, planes * n * k),
        }
        tot["weights"] += n * k
        tot["plane_bits"] += planes * n * k
        for key, size in sizes.items():
            tot["bytes"][key] += size
    weights = tot["weights"]
    totals = storage_bits(tot["bytes"], weights, tot["plane_bits"]) if weights else {"bytes": tot["bytes"]}
    quant_bytes = sum(tot["bytes"].values())
    other_bytes = sum(b for tname, (_, _, b) in header.items() if not tname.endswith(BTC_SUFFIXES))
    files = {p.name: p.stat().st_size for p in sorted(export.directory.iterdir()) if p.is_file()}
    return {
        "directory": str(export.directory),
        "format": export.manifest["format"],
        "format_version": export.manifest["format_version"],
        "scheme": describe_layers(export.modules, export.kv_bits),
        "kv_bits": export.kv_bits,
        "layers": layers,
        "totals": {
            "quantized_layers": len(layers),
            "expert_layers": sum(expert_index(name) is not None for name in layers),
            "quantized_weights": weights,
            **totals,
            "fp16_bytes_same_layers": weights * 2,
            "size_vs_fp16": quant_bytes / (weights * 2) if weights else 0.0,
            "unquantized_tensor_bytes": other_bytes,
            "model_file_bytes": sum(files.get(file.name, 0) for file in weight_files),
            "directory_bytes": sum(files.values()),
        },
        "files": files,
    }
