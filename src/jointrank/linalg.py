"""Rank-k and joint rank-k approximation of weight matrices. Pure functions: tensors in, factors out.

Conventions follow nn.Linear: a weight W is (d_out, d_in) and computes y = x Wᵀ. A rank-k factorisation is
W ≈ A B with B (k, d_in) the *input basis* (orthonormal rows, Vₖᵀ of the SVD) and A (d_out, k) the *output factor*
(Uₖ Sₖ). Joint rank-k stacks members that read the same input, [W_1; W_2; ...], factorises once, and splits A by rows:
every member keeps its own output factor and all share B, which is stored once (arXiv 2402.16319, Eq. 9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SOLVERS = ("auto", "svd", "gram", "gram32", "rsvd")
DEFAULT_SEED = 0
# Randomized SVD defaults, chosen on Gemma-3-270M weights (tests/test_solvers.py): LLM weight spectra decay slowly,
# the gap σ_k/σ_{k+1} is tiny, and a textbook sketch (k + 10 columns, 1-2 iterations) misses the exact relative
# error by 1e-2. A sketch twice as wide as k and 6 subspace iterations (arXiv 0909.4061, Alg. 4.4) bring it to
# within 2e-3 at approximation ratios 0.05-0.4 (1e-4 at 0.4 and above on attention weights).
RSVD_OVERSAMPLE = 1.0  # extra sketch columns as a fraction of k (at least 16)
RSVD_ITERS = 6  # subspace iterations, each one pass with W and one with Wᵀ
# auto never picks the randomized solver below this size: exact solvers are fast there and their output is optimal
RSVD_MIN_DIM = 2048


@dataclass(frozen=True)
class Solver:
    """How one unit's decomposition runs: the solver's name (SOLVERS), its seed (only the randomized solver draws
    random numbers) and the device the arithmetic runs on (default: where the weights are)."""

    name: str = "auto"
    seed: int | None = None
    device: str | None = None

    @classmethod
    def of(cls, value: "Solver | str | None") -> "Solver":
        """A Solver from a Solver or a solver name (the older, name-only form)."""
        return value if isinstance(value, Solver) else cls(name=value or "auto")


@dataclass
class Factors:
    """The result of one (joint) rank-k approximation."""

    basis: torch.Tensor  # (k, d_in), orthonormal rows
    outs: list[torch.Tensor]  # one (d_out_i, k) per member, in the order given
    singular_values: torch.Tensor  # all of them, descending, of the stacked matrix
    energy_kept: float  # Σ_{i<k} s_i² / Σ s_i²: the fraction of squared Frobenius norm kept
    rel_error: float  # ‖W - A B‖_F / ‖W‖_F of the stacked matrix, = sqrt(1 - energy_kept)
    member_rel_errors: list[float]  # the same, measured for each member on its own
    solver: str = ""  # the solver that actually ran ("gram" when "gram32" fell back to float64)

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def reconstruct(self, member: int = 0) -> torch.Tensor:
        return self.outs[member] @ self.basis


def joint_params(d_outs: list[int] | tuple[int, ...], d_in: int, k: int) -> int:
    """Parameters of a joint rank-k factorisation: k·(Σ d_out_i + d_in), the paper's Eq. 9 (biases not included)."""
    return k * (sum(d_outs) + d_in)


def max_rank(d_outs: list[int] | tuple[int, ...], d_in: int) -> int:
    return min(sum(d_outs), d_in)


def rank_k(weight: torch.Tensor, k: int, solver: str = "auto", **options) -> Factors:
    """Best rank-k approximation of one matrix in Frobenius and spectral norm (Eckart–Young)."""
    return joint_rank_k([weight], k, solver=solver, **options)


def joint_rank_k(weights: list[torch.Tensor], k: int, solver: str = "auto", *, seed: int | None = None,
                 device: str | torch.device | None = None, oversample: int | None = None,
                 iters: int | None = None) -> Factors:
    """Joint rank-k approximation of matrices that read the same input (same d_in), stacked along d_out.

    The arithmetic is float32 at least (float64 for the Gram solver) whatever the storage dtype, because bfloat16
    SVDs lose the small singular values this method is deciding about. It runs on `device` (default: the input's)
    and the factors come back in float32 there; the caller casts them to the model's dtype and device.

    Solvers: "svd" exact SVD; "gram" eigh of the float64 Gram matrix (exact up to rounding); "gram32" the same in
    float32, redone in float64 when float32 cannot resolve the k-th eigenvalue; "rsvd" seeded randomized
    SVD (`seed`, default DEFAULT_SEED; `oversample` extra columns, `iters` subspace iterations), deterministic for
    a seed on a given device and thread count; "auto" chooses by shape and rank (see choose_solver).
    """
    if not weights:
        raise ValueError("joint_rank_k needs at least one matrix")
    d_in = weights[0].shape[1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != d_in:
            raise ValueError(f"members must be 2-D with the same d_in; got {[tuple(x.shape) for x in weights]}")
    d_outs = [w.shape[0] for w in weights]
    limit = max_rank(d_outs, d_in)
    if not 1 <= k <= limit:
        raise ValueError(f"rank {k} is out of range for a {sum(d_outs)}x{d_in} matrix (1 to {limit})")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")

    stacked = torch.cat([w.to(device=device, dtype=torch.float32) for w in weights], dim=0)
    if solver == "auto":
        solver = choose_solver(tuple(stacked.shape), k)
    if solver == "svd":
        u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        basis, out = vh[:k], u[:, :k] * s[:k]
    elif solver in ("gram", "gram32"):
        if solver == "gram32":
            s, basis, solver = _gram32_svd(stacked, k)
        else:
            s, basis = gram_svd(stacked, k)
        out = stacked @ basis.T  # = U_k S_k, exact for the chosen basis
    else:
        s, basis, out = _randomized_svd(stacked, k, seed=DEFAULT_SEED if seed is None else seed,
                                        oversample=oversample, iters=RSVD_ITERS if iters is None else iters)

    outs = list(torch.split(out, d_outs, dim=0))
    member_errors = [_member_error(w.to(device=stacked.device, dtype=torch.float32), a, basis)
                     for w, a in zip(weights, outs)]
    if solver == "rsvd":
        # Only the leading singular values are known: the error is measured on the factors, member by member.
        norms2 = [_norm2(w.to(device=stacked.device, dtype=torch.float32)) for w in weights]
        total = sum(norms2)
        lost = sum(e * e * n2 for e, n2 in zip(member_errors, norms2))
        energy = 1.0 - lost / total if total > 0 else 1.0
    else:
        total = float((s.double() ** 2).sum())
        kept = float((s[:k].double() ** 2).sum())
        energy = kept / total if total > 0 else 1.0
    return Factors(
        basis=basis.contiguous(),
        outs=[a.contiguous() for a in outs],
        singular_values=s,
        energy_kept=energy,
        rel_error=max(0.0, 1.0 - energy) ** 0.5,
        member_rel_errors=member_errors,
        solver=solver,
    )


def _member_error(w: torch.Tensor, a: torch.Tensor, basis: torch.Tensor) -> float:
    """‖W - A B‖_F / ‖W‖_F for one member. A = W Bᵀ with orthonormal B, so A B is the projection of W's rows and
    ‖W - A B‖² = ‖W‖² - ‖A‖² (Pythagoras): on big matrices that saves a d_out·k·d_in product per member. Small ones
    are measured directly, where the float64 difference of norms would be too coarse near full rank."""
    norm2 = _norm2(w)
    if norm2 == 0:
        return 0.0
    if w.numel() <= 1 << 22:
        return float(torch.linalg.matrix_norm(w - a @ basis)) / norm2 ** 0.5
    return max(0.0, 1.0 - _norm2(a) / norm2) ** 0.5


def _norm2(x: torch.Tensor) -> float:
    """‖x‖²_F accumulated in float64 without a float64 copy of x (which is 350 MB for one LLaMA-7B gate_proj)."""
    return float(torch.sum(x * x, dtype=torch.float64))


def choose_solver(shape: tuple[int, int], k: int) -> str:
    """The solver "auto" uses for a (rows, cols) matrix and rank k: a pure function of shape and rank.

    Small matrices: exact (SVD, or the Gram matrix when one side is at least twice the other, which is several
    times faster and as accurate in float64). Large ones: the float32 Gram solver (float64 where needed), or the
    randomized SVD when its estimated cost is lower, which on CPUs needs a small k/min(rows, cols): it must
    iterate to stay within 1e-3 of the exact error on the slowly decaying spectra of LLM weights. Cost model
    (flops weighted by their cost on CPUs): the Gram solver forms a Gram matrix (rows·cols·min) and
    eigendecomposes it (~9 min³, LAPACK syevd, slow per flop); the randomized one makes 2·iters+1 passes over
    the matrix with ℓ = k + oversample columns, plus QR and a float64 ℓ×ℓ problem.
    """
    rows, cols = shape
    small = min(rows, cols)
    if small < RSVD_MIN_DIM:
        return "gram" if max(rows, cols) >= 2 * small else "svd"
    ell = _sketch_size(k, small)
    float64_matmul, float32_matmul, lapack = 2.0, 1.0, 6.0  # relative cost per flop
    gram = float32_matmul * 2 * rows * cols * small + lapack * 9 * small ** 3 / 3
    rsvd = (float32_matmul * (2 * RSVD_ITERS + 1) * 2 * rows * cols * ell
            + lapack * (RSVD_ITERS + 1) * 2 * cols * ell ** 2
            + float64_matmul * 2 * rows * ell ** 2 + lapack * 9 * ell ** 3 / 3)
    return "rsvd" if rsvd < gram else "gram32"


def _sketch_size(k: int, small: int, oversample: int | None = None) -> int:
    extra = oversample if oversample is not None else max(16, math.ceil(RSVD_OVERSAMPLE * k))
    return min(small, k + extra)


def _randomized_svd(matrix: torch.Tensor, k: int, *, seed: int, oversample: int | None,
                    iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k right singular vectors of a (rows, cols) float32 matrix by seeded subspace iteration on its row space.

    Z spans an approximation of the top right singular subspace: Z ← orth(Mᵀ(M Z)), started from a Gaussian
    sketch drawn from a generator seeded with `seed` (never the global RNG), so the result depends on nothing
    but the inputs. Rayleigh–Ritz on C = M Z (the float64 eigenproblem of CᵀC, ℓ×ℓ) then gives the basis, the
    leading ℓ singular values and the output factor C W_k = M Bᵀ without another pass over M.
    Returns (leading singular values, basis (k, cols), out (rows, k)).
    """
    rows, cols = matrix.shape
    ell = _sketch_size(k, min(rows, cols), oversample)
    generator = torch.Generator(device=matrix.device).manual_seed(int(seed))
    z = torch.randn(cols, ell, generator=generator, device=matrix.device, dtype=matrix.dtype)
    z = torch.linalg.qr(z).Q
    for _ in range(iters):
        z = torch.linalg.qr(matrix.T @ (matrix @ z)).Q
    c = matrix @ z  # (rows, ℓ)
    c64 = c.double()
    evals, w = torch.linalg.eigh(c64.T @ c64)  # ascending
    evals, w = evals.flip(0), w.flip(1)
    s = evals.clamp_min(0).sqrt()
    wk = w[:, :k]
    basis = (z.double() @ wk).T.to(matrix.dtype)
    out = (c64 @ wk).to(matrix.dtype)
    return s.to(torch.float32), basis, out


# float32 resolves Gram eigenvalues to about sqrt(n)·eps·λ_max (rounding errors of a length-n dot product add up
# like a random walk). The float32 basis is used when the truncation error it can cost is provably below this
# (the same tolerance tests/test_solvers.py states for the exact solvers); otherwise the float64 Gram is used.
GRAM32_TOLERANCE = 1e-5


def _gram32_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """gram_svd in float32, two to three times as fast; float64 when float32 could cost accuracy.

    Squaring the matrix squares its condition number, so float32 only loses the *small* eigenvalues, those below
    the resolution r = sqrt(n)·eps·λ_max. A kept direction whose eigenvalue is resolved is kept correctly (its
    mixing with others is second order in r/gap). A kept direction whose eigenvalue is below ~2r may be swapped for
    one worth nothing, which loses at most ~2r of energy. So with u such directions the relative error grows by at
    most sqrt(e² + 2ur/‖W‖²) - e; float32 is accepted when that is below GRAM32_TOLERANCE. On LLM weights at
    practical ranks u is 0 (measured: results/compress_speed.md records which solver each unit used).
    Returns (singular values, basis, the solver that ran).
    """
    rows, cols = matrix.shape
    inner = max(rows, cols)
    gram = matrix.T @ matrix if cols <= rows else matrix @ matrix.T
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    resolution = inner ** 0.5 * torch.finfo(torch.float32).eps * float(evals[0])
    unresolved = int((evals[:k] < 2 * resolution).sum())
    if unresolved:
        energy = evals.double().clamp_min(0)
        total, tail = float(energy.sum()), float(energy[k:].sum())
        error = (tail / total) ** 0.5
        bound = ((tail + 2 * unresolved * resolution) / total) ** 0.5 - error
        if bound > GRAM32_TOLERANCE:
            s, basis = gram_svd(matrix, k)
            return s, basis, "gram"
    if cols <= rows:
        basis = evecs[:, :k].T
    else:
        right = matrix.T @ evecs[:, :k]
        basis = (right / right.norm(dim=0, keepdim=True).clamp_min(1e-30)).T
    return evals.clamp_min(0).sqrt(), basis.contiguous(), "gram32"


def gram_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k right singular vectors (k, d_in) and all singular values, from the eigenvectors of MᵀM or MMᵀ."""
    m64 = matrix.to(torch.float64)
    rows, cols = m64.shape
    if cols <= rows:
        evals, evecs = torch.linalg.eigh(m64.T @ m64)  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        basis = evecs[:, :k].T
    else:
        # Wide matrix: eigenvectors of MMᵀ are the left vectors; right ones are Mᵀu / s.
        evals, evecs = torch.linalg.eigh(m64 @ m64.T)
        evals, evecs = evals.flip(0), evecs.flip(1)
        top = evecs[:, :k]
        right = m64.T @ top
        basis = (right / right.norm(dim=0, keepdim=True).clamp_min(1e-300)).T
    s = evals.clamp_min(0).sqrt()
    return s.to(torch.float32), basis.to(torch.float32)


def spectrum(weights: list[torch.Tensor], device: str | torch.device | None = None) -> torch.Tensor:
    """Singular values of the stacked matrix, descending (for plans that choose ranks from energy)."""
    stacked = torch.cat([w.to(device=device, dtype=torch.float32) for w in weights], dim=0)
    return torch.linalg.svdvals(stacked)
