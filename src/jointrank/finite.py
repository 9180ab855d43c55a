"""NaN and Inf: refused in the weights before any work, and in the factors before anything is saved.

A non-finite weight makes every solver produce garbage: the Gram and randomized solvers return all-NaN factors
(and NaN energies that print as "kept 1.0"), the exact SVD raises a LinAlgError. Neither is the user's intent, so
the weight is named and the run stops before it starts. Factors are checked too: a solver bug or an overflow in a
low-precision cast must not reach a checkpoint that looks finished.
"""

from __future__ import annotations

import torch

from .errors import JointRankError


def check_weights(named_tensors, where: str = "the model") -> None:
    """Refuse the first floating tensor holding NaN or Inf, by name. `named_tensors`: (name, tensor) pairs."""
    for name, t in named_tensors:
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise JointRankError(f"{where} has non-finite values (NaN or Inf) in {name} ({bad} of {t.numel()}); a "
                                 "low-rank approximation of it would be meaningless: fix or re-download the weights")


def check_factors(entry, factors) -> None:
    """Refuse factors that are not finite, naming the unit, before they are installed or saved."""
    tensors = [factors.basis, *factors.outs]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise JointRankError(f"factorising {'+'.join(entry.members)} (rank {entry.rank}, solver "
                             f"{getattr(factors, 'solver', '') or '?'}) gave non-finite factors; nothing was saved. "
                             "Try --solver svd, or a float32 --dtype")
