"""The BTC contract: what every packed weight and every GEMM backend agrees on (DESIGN §5, docs/FORMAT.md).

The bit-plane layout pads K to a multiple of `K_ALIGN` columns — the K of the smallest binary tensor-core
step (m16n8k128) — and stores each 32-column chunk of a plane in one `WORD_BITS`-bit word. Codes are uint8,
so at most `MAX_PLANES` planes. A GEMM with quantized activations runs on whole 128-column tiles, so a
grouped weight needs a group size that is a multiple of `K_ALIGN` (`check_btc_group`), and its int32
accumulators must not overflow (`check_int32_bound`). This module imports nothing of abq: the format, the
reference GEMM, the kernels and the exporter all take these facts from here.
"""

from __future__ import annotations

K_ALIGN = 128  # columns: padded K and the BTC group sizes are multiples of this
WORD_BITS = 32  # columns per plane word (uint32, LSB first)
MAX_PLANES = 8  # codes are uint8
INT32_MAX = 2**31 - 1


def check_int32_bound(k: int, qmax_a: int, qmax_w: int) -> None:
    """Refuse a GEMM whose int32 accumulator could overflow.

    A dot product of K codes is at most `k · qmax_a · qmax_w`; the kernel accumulates it in int32, so
    abq requires `k · qmax_a · qmax_w <= 2**31 - 1` (e.g. A8W8: K <= 33025; A4W4: K <= 9544371).
    """
    bound = int(k) * int(qmax_a) * int(qmax_w)
    if bound > INT32_MAX:
        raise ValueError(
            f"K={k} with qmax_a={qmax_a}, qmax_w={qmax_w} can reach {bound} > int32 max {INT32_MAX}"
        )


def check_btc_group(group_size: int | None) -> None:
    """Refuse a weight group size the BTC GEMM with quantized activations cannot run (ValueError)."""
    if group_size is not None and group_size % K_ALIGN:
        raise ValueError(
            f"group_size {group_size} cannot run the BTC GEMM: activation-quantized layers need "
            f"per-channel weights or a group size that is a multiple of {K_ALIGN} "
            f"(groups must cover whole 128-column tiles); weight-only (A16) layers accept any group size"
        )
