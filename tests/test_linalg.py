"""Rank-k and joint rank-k approximation: optimality, parameter accounting, solvers, input checks."""

import pytest
import torch

from jointrank.linalg import joint_params, joint_rank_k, rank_k


def matrix_with_spectrum(d_out, d_in, singular_values, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(singular_values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(singular_values), generator=g, dtype=torch.float64))
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("solver", ["svd", "gram"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (96, 16)])
def test_eckart_young_error_is_the_tail_energy(solver, shape):
    d = min(shape)
    s = [float(2.0 ** -(i / 3)) for i in range(d)]
    w = matrix_with_spectrum(*shape, s).float()
    k = d // 3
    f = rank_k(w, k, solver=solver)
    err2 = float(torch.linalg.matrix_norm(w - f.reconstruct()) ** 2)
    tail = sum(x * x for x in s[k:])
    assert err2 == pytest.approx(tail, rel=1e-3)
    assert f.energy_kept == pytest.approx(sum(x * x for x in s[:k]) / sum(x * x for x in s), rel=1e-4)
    assert f.rel_error == pytest.approx((tail / sum(x * x for x in s)) ** 0.5, rel=1e-3)


def test_no_other_rank_k_matrix_does_better():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(30, 20, generator=g)
    k = 5
    best = float(torch.linalg.matrix_norm(w - rank_k(w, k).reconstruct()))
    f = rank_k(w, k)
    candidates = [torch.randn(30, k, generator=g) @ torch.randn(k, 20, generator=g) for _ in range(50)]
    # perturbations of the optimum, and the least-squares fit on a random basis: all must be worse
    candidates += [(f.outs[0] + 1e-2 * torch.randn(30, k, generator=g)) @ f.basis for _ in range(50)]
    for _ in range(50):
        q, _ = torch.linalg.qr(torch.randn(20, k, generator=g))
        candidates.append(w @ q @ q.T)
    assert all(float(torch.linalg.matrix_norm(w - c)) > best - 1e-5 for c in candidates)


def test_joint_params_is_equation_9_and_factors_have_those_shapes():
    q, k_ = torch.randn(64, 48), torch.randn(16, 48)
    f = joint_rank_k([q, k_], 10)
    assert f.basis.shape == (10, 48) and [o.shape for o in f.outs] == [(64, 10), (16, 10)]
    stored = f.basis.numel() + sum(o.numel() for o in f.outs)
    assert stored == joint_params([64, 16], 48, 10) == 10 * (64 + 16 + 48)
    separate = joint_params([64], 48, 10) + joint_params([16], 48, 10)
    assert stored < separate  # the shared basis is stored once


def test_joint_with_one_member_equals_separate():
    w = torch.randn(32, 24)
    a, b = joint_rank_k([w], 7), rank_k(w, 7)
    assert torch.allclose(a.reconstruct(), b.reconstruct(), atol=1e-6)
    assert a.energy_kept == b.energy_kept


def test_joint_is_the_best_rank_k_of_the_stack_and_member_errors_add_up():
    q, k_ = torch.randn(40, 24), torch.randn(10, 24)
    f = joint_rank_k([q, k_], 6)
    stacked = torch.cat([q, k_])
    total = float(torch.linalg.matrix_norm(stacked - torch.cat(f.outs) @ f.basis))
    assert total == pytest.approx(float(torch.linalg.matrix_norm(stacked - rank_k(stacked, 6).reconstruct())),
                                  rel=1e-4)
    per_member_sq = sum((e * float(torch.linalg.matrix_norm(w))) ** 2 for e, w in zip(f.member_rel_errors, [q, k_]))
    assert per_member_sq == pytest.approx(total**2, rel=1e-4)


def test_full_rank_is_exact_and_basis_is_orthonormal():
    w = torch.randn(20, 12)
    for solver in ("svd", "gram"):
        f = rank_k(w, 12, solver=solver)
        assert torch.allclose(f.reconstruct(), w, atol=1e-4)
        assert torch.allclose(f.basis @ f.basis.T, torch.eye(12), atol=1e-4)


def test_low_precision_storage_is_factorised_in_float32():
    w = torch.randn(48, 32)
    f = rank_k(w.to(torch.bfloat16), 8)
    assert f.basis.dtype == torch.float32
    ref = rank_k(w.to(torch.bfloat16).float(), 8)
    assert torch.allclose(f.reconstruct(), ref.reconstruct(), atol=1e-5)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        rank_k(torch.randn(8, 6), 7)
    with pytest.raises(ValueError, match="out of range"):
        rank_k(torch.randn(8, 6), 0)
    with pytest.raises(ValueError, match="same d_in"):
        joint_rank_k([torch.randn(8, 6), torch.randn(8, 5)], 2)
    with pytest.raises(ValueError, match="unknown solver"):
        rank_k(torch.randn(8, 6), 2, solver="magic")
