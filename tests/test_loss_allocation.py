"""Loss-aware allocation (issue #15): the loss curve is the whitened, Fisher-weighted truncation tail; the Fisher is
the squared per-token gradient of the outputs; the planner meets the budget and spends it where the loss is
cheapest, choosing dense, separate or joint per group."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_model

import jointrank
from jointrank import GroupRule, JointRankConfig, JointRankError
from jointrank.architectures import describe
from jointrank.methods.calibration import Calibration
from jointrank.planning.loss import loss_curve, option_curves, output_fisher, plan_loss

ALL = {"qk": GroupRule("joint"), "v": GroupRule("separate"), "o": GroupRule("separate"),
       "gate_up": GroupRule("joint"), "down": GroupRule("separate")}


def calibration(n=4, seqlen=24):
    return Calibration(torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(0)), "random", 0)


def test_with_white_inputs_and_flat_fisher_the_curve_is_half_the_spectral_tail():
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    curve = loss_curve([w], torch.eye(20, dtype=torch.float64), torch.ones(30), 10, damping=0.0)
    expected = [0.5 * float((s[k:] ** 2).sum()) for k in range(1, 11)]
    assert curve == pytest.approx(expected, rel=1e-9)
    # a loss that cares about one output row only: its weight is that row's share of each direction
    f = torch.zeros(30)
    f[3] = 2.0
    u, s2, _ = torch.linalg.svd(w, full_matrices=False)
    one = loss_curve([w], torch.eye(20, dtype=torch.float64), f, 10, damping=0.0)
    assert one == pytest.approx([float((s2[k:] ** 2 * u[3, k:] ** 2).sum()) for k in range(1, 11)], rel=1e-9)


def whitened_svd_curve(weights, second_moment, fisher, k_max, damping):
    """The curve as the module doc defines it: the SVD of the whitened stack W S."""
    from jointrank.methods.svd_llm import cholesky_factor

    u, s, _ = torch.linalg.svd(torch.cat(weights) @ cholesky_factor(second_moment, damping), full_matrices=False)
    tail = (0.5 * s.pow(2) * (fisher[:, None] * u.pow(2)).sum(0)).flip(0).cumsum(0).flip(0)
    n = min(k_max, len(s) - 1)
    return np.concatenate([tail[1:n + 1].numpy(), np.zeros(k_max - n)])


@pytest.mark.parametrize("d_outs", [(30,), (12,), (20,), (16, 16), (6, 8), (24, 4, 4)],
                         ids=["tall", "wide", "square", "joint-tall", "joint-wide", "joint-tall-of-wide-members"])
def test_every_option_curve_equals_the_whitened_svd_curve(d_outs):
    gen = torch.Generator().manual_seed(sum(d_outs))
    d_in = 20
    weights = [torch.randn(d, d_in, generator=gen, dtype=torch.float64) for d in d_outs]
    x = torch.randn(200, d_in, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, d_in, dtype=torch.float64)
    moment = x.T @ x / len(x) + 0.1  # correlated inputs, a decaying spectrum
    fishers = [torch.rand(d, generator=gen, dtype=torch.float64) for d in d_outs]
    options = {(i,): 5 for i in range(len(d_outs))} | {tuple(range(len(d_outs))): 25}
    found = option_curves(weights, moment, fishers, options, damping=0.01)
    for idx, k_max in options.items():
        expected = whitened_svd_curve([weights[i] for i in idx], moment, torch.cat([fishers[i] for i in idx]),
                                      k_max, 0.01)
        np.testing.assert_allclose(found[idx], expected, rtol=1e-9, atol=1e-12 * expected[0])


def test_output_fisher_is_the_mean_squared_gradient_of_the_summed_nll():
    model = tiny_model("llama").double()
    cal = calibration(2, 12)
    name = "model.layers.1.mlp.down_proj"
    fisher = output_fisher(model, cal, [name], progress=False)[name]
    captured, total, tokens = {}, torch.zeros(model.get_submodule(name).out_features, dtype=torch.float64), 0
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: captured.__setitem__("y", out))
    for row in cal.input_ids:
        logits = model(input_ids=row[None]).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")
        (g,) = torch.autograd.grad(nll, captured["y"])
        total += g.pow(2).sum((0, 1))
        tokens += len(row) - 1
    handle.remove()
    torch.testing.assert_close(fisher, total / tokens)


def test_the_plan_meets_the_budget_and_matches_compress():
    model = tiny_model("mistral")
    config = JointRankConfig(rules=ALL, target=0.3, scope="decoder", allocation="loss")
    plan = jointrank.plan_for(model, config, calibration=calibration(), progress=False)
    step = max(sum(e.d_outs) + e.d_in for e in plan.factorised)
    assert 0.3 <= plan.params_removed / plan.params_decoder_before <= 0.3 + step / plan.params_decoder_before
    result = jointrank.compress_(model, plan, progress=False)
    assert result.params_decoder_after == plan.params_decoder_after


def test_the_budget_goes_where_the_loss_is_cheapest_in_the_cheapest_structure():
    layout = describe(tiny_model("llama"))
    config = JointRankConfig(rules={"qk": GroupRule("joint"), "v": GroupRule("separate")}, target=0.08,
                             scope="decoder", allocation="loss")
    curves = {}
    for g in layout.groups:
        if g.group not in ("qk", "v"):
            continue
        d_in = g.d_in
        for members in ([g.members] if len(g.members) > 1 else []) + [[m] for m in g.members]:
            d = sum(m.d_out for m in members)
            k_break = (d * d_in - 1) // (d + d_in)
            ks = np.arange(1, k_break + 1)
            cost = 1e6 if g.group == "v" and g.layer == 0 else 1.0  # layer 0's V is fragile
            if g.group == "qk" and len(members) == 1:
                cost *= 10  # Q and K truncated alone hurt more than together
            curves[tuple(m.name for m in members)] = cost * (k_break - ks + 1.0) / k_break
    plan = plan_loss(layout, config, curves)
    by = {(e.layer, e.group): e for e in plan.entries}
    assert by[(0, "v")].structure == "keep" and "kept dense" in by[(0, "v")].note
    assert {e.structure for e in plan.entries if e.group == "qk" and e.structure != "keep"} == {"joint"}
    assert plan.params_removed >= 0.08 * plan.params_decoder_before
    flipped = {k: (v / 100 if len(k) == 1 and "k_proj" in k[0] or len(k) == 1 and "q_proj" in k[0] else v)
               for k, v in curves.items()}
    plan2 = plan_loss(layout, config, flipped)
    assert {e.structure for e in plan2.entries if e.group == "qk" and e.structure != "keep"} == {"separate"}


def test_loss_allocation_needs_calibration_and_the_in_memory_path(tmp_path):
    config = JointRankConfig(rules=ALL, target=0.2, scope="decoder", allocation="loss")
    with pytest.raises(JointRankError, match="--allocation loss estimates"):
        jointrank.plan_for(tiny_model("llama"), config)
    from jointrank.stream import StreamOptions, compress_checkpoint

    tiny_model("llama").save_pretrained(tmp_path / "src")
    with pytest.raises(JointRankError, match="drop --stream"):
        compress_checkpoint(tmp_path / "src", tmp_path / "out", config, options=StreamOptions(progress=False))
    with pytest.raises(JointRankError, match="give --target"):
        jointrank.plan_for(tiny_model("llama"), dataclasses.replace(config, target=None, ratio=0.5))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text"])  # plain; soft-capped logits; tied + scaled
def test_output_fisher_allocates_no_parameter_gradient_and_matches_full_logits(arch, monkeypatch):
    from jointrank.evaluate import perplexity

    model = tiny_model(arch).double()
    cal = calibration(2, 12)
    names = [n for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    chunked = output_fisher(model, cal, names, progress=False, loss_chunk=5)  # windows of 12: chunks 5, 5, 1
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # nothing left, nothing frozen
    monkeypatch.setattr(perplexity, "split_model", lambda m: None)  # the model's own forward, full logits
    full = output_fisher(model, cal, names, progress=False)
    for name in names:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-5, atol=0)  # the loss is float32 in both
