"""Hadamard matrices of the sizes LLMs use, and the online Hadamard transform (docs/FORMAT.md §7).

A Hadamard matrix H of order n has entries ±1 and H·Hᵀ = n·I, so H/√n is orthogonal. Orders that are
not powers of two (SmolLM2: hidden 576 = 36·16, intermediate 1536 = 12·128) are built as a Kronecker
product A ⊗ B of a Paley matrix A of order m and a Sylvester matrix B of order p = 2^k:

- Sylvester: B_1 = [1], B_2p = [[B_p, B_p], [B_p, −B_p]].
- Paley I (q prime, q ≡ 3 mod 4), order m = q + 1: with the Jacobsthal matrix Q[i, j] = χ(j − i) (χ the
  quadratic character mod q: 0 at 0, +1 on squares, −1 otherwise) and S = [[0, 1ᵀ], [−1, Q]],
  A = I + S.
- Paley II (q prime, q ≡ 1 mod 4), order m = 2(q + 1): with C = [[0, 1ᵀ], [1, Q]],
  A = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]].

`kronecker_factors(n)` picks the largest p = 2^k dividing n for which m = n / p is 1, 2 or a Paley order
(SmolLM2: 576 → 36 (Paley II, q = 17) ⊗ 16, 1536 → 12 (Paley I, q = 11) ⊗ 128, 64 → 1 ⊗ 64).

The online transform of a vector x [n] is y = x · H / √n, index i = a·p + b (a over A, b over B); with
X = x viewed as [m, p], Y = Aᵀ · X · B / √n. It is its own inverse up to the transpose: Hᵀ undoes it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

HADAMARD = "hadamard"  # the name of the online transform in recipes, manifests and layer metadata
INPUT_TRANSFORMS = (HADAMARD,)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def sylvester(p: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order p (a power of two), int64."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Sylvester order must be a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.int64)
    index = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q  # [i, j] -> (j - i) mod q
    return chi[index]


def _paley_prime(m: int) -> tuple[int, int] | None:
    """(q, construction 1 or 2) when a Paley construction gives order m, else None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return m - 1, 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return m // 2 - 1, 2
    return None


def paley(m: int) -> torch.Tensor:
    """The Paley Hadamard matrix of order m (construction I or II, see the module docstring), int64."""
    found = _paley_prime(m)
    if found is None:
        raise ValueError(f"no Paley construction gives order {m}")
    q, construction = found
    jac = _jacobsthal(q)
    ones = torch.ones(q, 1, dtype=torch.int64)
    if construction == 1:
        s = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.int64), ones.T], 1), torch.cat([-ones, jac], 1)], 0)
        return torch.eye(q + 1, dtype=torch.int64) + s
    c = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.int64), ones.T], 1), torch.cat([ones, jac], 1)], 0)
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    minus = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int64), minus)


def kronecker_factors(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m·p, p the largest power of two for which order m is 1, 2 or Paley; None when
    no such split exists (then abq knows no Hadamard matrix of order n)."""
    p = n & -n if n > 0 else 0
    while p >= 1:
        m = n // p
        if m in (1, 2) or _paley_prime(m) is not None:
            return m, p
        p //= 2
    return None


def has_hadamard(n: int) -> bool:
    return kronecker_factors(n) is not None


@lru_cache(maxsize=16)
def _factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    split = kronecker_factors(n)
    if split is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known to abq")
    m, p = split
    a = sylvester(m) if m in (1, 2) else paley(m)
    return a, sylvester(p)


def hadamard_matrix(n: int) -> torch.Tensor:
    """The Hadamard matrix A ⊗ B of order n (±1 entries, int64); H·Hᵀ = n·I."""
    a, b = _factors(n)
    return torch.kron(a, b)


def orthonormal_hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H / √n: orthogonal."""
    return hadamard_matrix(n).to(dtype) / math.sqrt(n)


@lru_cache(maxsize=32)
def _normalised_factors(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Â, B̂) = (A / √m, B / √p) in this dtype on this device, built once (the transform runs per forward)."""
    a, b = _factors(n)
    return ((a.to(dtype) / math.sqrt(a.shape[0])).to(device), (b.to(dtype) / math.sqrt(b.shape[0])).to(device))


def hadamard_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The online transform y = x · H / √n over the last dimension (module docstring), in x's dtype:
    Y = (Âᵀ · X) · B̂ with Â = A / √m and B̂ = B / √p. `inverse`: y = x · Hᵀ / √n, Y = (Â · X) · B̂ᵀ."""
    a_hat, b_hat = _normalised_factors(x.shape[-1], x.dtype, x.device)
    if inverse:
        a_hat, b_hat = a_hat.T, b_hat.T
    grid = x.reshape(*x.shape[:-1], a_hat.shape[0], b_hat.shape[0])
    return torch.matmul(torch.matmul(a_hat.T, grid), b_hat).reshape(x.shape)


def apply_input_transform(x: torch.Tensor, transform: str | None, inverse: bool = False) -> torch.Tensor:
    """What a quantized linear does to its input before the activation quantizer (None: nothing);
    `inverse` undoes it (for an orthogonal transform x·M: x·Mᵀ)."""
    if transform is None:
        return x
    if transform == HADAMARD:
        return hadamard_transform(x, inverse)
    raise ValueError(f"unknown input transform {transform!r} (known: {', '.join(INPUT_TRANSFORMS)})")
