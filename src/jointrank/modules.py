"""Low-rank layers that replace nn.Linear. A joint group's members share one input basis, stored once.

State-dict names (what a checkpoint holds):
  separate:  <layer>.q_proj.basis.weight (k, d_in)       <layer>.q_proj.out.weight (d_out, k) [+ .out.bias]
  joint:     <parent>.qk_basis.weight (k, d_in), once     <layer>.q_proj.out.weight, <layer>.k_proj.out.weight
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn


class SharedBasis(nn.Module):
    """The input basis B (k, d_in) of a joint group, registered once on the members' parent module.

    Members of a group are called one after another on the *same* input tensor (q_proj(h), k_proj(h)), so the
    projection x Bᵀ is computed by the first caller and handed to the others: a joint group then costs
    k·d_in multiply-adds once per token instead of once per member. The cache is keyed on the identity of the
    input tensor (held weakly), its version counter and the basis weight's version, so a different or modified
    input, or a reloaded basis, is never served stale.

    Under torch.inference_mode tensors carry no version counter; the projection is then still shared, keyed on
    identity alone. That is safe for model code that can be trained: a Linear saves its input for the weight
    gradient, so code modifying q_proj's input in place before calling k_proj on it would already fail under
    autograd. Not sharing there would cost one extra k·d_in matmul per group and token (measured in
    bench/inference_speed.py). `shared_projection(False)` turns sharing off, for tests and measurements.
    """

    enabled = True  # class-wide switch, see shared_projection()

    def __init__(self, rank: int, in_features: int, num_members: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.num_members = num_members
        self._cache: tuple | None = None  # (weakref to input, version, projection, uses left)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if not SharedBasis.enabled or self.num_members < 2:
            self._cache = None
            return nn.functional.linear(x, self.weight)
        cache = self._cache
        key = (_version(x), _version(self.weight))
        if cache is not None and cache[0]() is x and cache[1] == key:
            ref, _, projected, uses_left = cache
            self._cache = (ref, key, projected, uses_left - 1) if uses_left > 1 else None
            return projected
        projected = nn.functional.linear(x, self.weight)
        self._cache = (weakref.ref(x), key, projected, self.num_members - 1)
        return projected

    def extra_repr(self) -> str:
        return f"rank={self.weight.shape[0]}, in_features={self.weight.shape[1]}, shared_by={self.num_members}"


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # an inference tensor has no version counter: identity alone (see SharedBasis)
        return None


@contextlib.contextmanager
def shared_projection(enabled: bool):
    """Turn sharing of joint projections on or off inside a block (every member then projects for itself)."""
    previous, SharedBasis.enabled = SharedBasis.enabled, enabled
    try:
        yield
    finally:
        SharedBasis.enabled = previous


class LowRankLinear(nn.Module):
    """y = (x Bᵀ) Aᵀ + b: a drop-in for nn.Linear holding only the factors.

    A separate layer owns its basis (registered as `basis`); a joint member borrows its group's SharedBasis
    without registering it, so the basis appears once in parameters(), state_dict() and on disk.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 shared_basis: SharedBasis | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        if shared_basis is None:
            self.basis = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        else:
            object.__setattr__(self, "_shared", shared_basis)  # deliberately not a submodule: stored once
        self.out = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def shared_basis(self) -> SharedBasis | None:
        return self.__dict__.get("_shared")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.out.bias

    @property
    def basis_weight(self) -> torch.Tensor:
        shared = self.shared_basis
        return shared.weight if shared is not None else self.basis.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_basis
        hidden = shared.project(x) if shared is not None else self.basis(x)
        return self.out(hidden)

    def dense_weight(self) -> torch.Tensor:
        """A B: the (d_out, d_in) matrix this layer computes, for merging back into an nn.Linear."""
        return (self.out.weight.float() @ self.basis_weight.float()).to(self.out.weight.dtype)

    def extra_repr(self) -> str:
        kind = "joint" if self.shared_basis is not None else "separate"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, {kind}"
