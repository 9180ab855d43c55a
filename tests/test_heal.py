"""Healing and self-generated calibration: what each promises, on tiny random models.

refit is a least-squares optimum and lowers every unit's output error; distillation lowers the loss it trains on;
neither changes a parameter count; an interrupted distillation resumes to the same factors; self-generated text is
seeded, cached, starts every window with BOS and samples only inside the nucleus; a healed checkpoint reloads with
the same logits; the CLI runs the whole chain with no user data and refuses bad healing flags in one line.
"""

import json

import pytest
import torch
from conftest import tiny_model

import jointrank
from jointrank import GroupRule, JointRankConfig, JointRankError
from jointrank.architectures import count_parameters
from jointrank.cli import main
from jointrank.heal import (DistillSettings, _kl_backward, distill_, head_in, heal_, refit_, teacher_copy,
                            trainable_factors)
from jointrank.methods.calibration import Calibration
from jointrank.methods.selfgen import (LoopGuard, SamplingSettings, _sample, _to_dtype, parse_spec,
                                      repeated_ngram_share, sample_windows, self_calibration)

ALL = {"qk": GroupRule("joint"), "gate_up": GroupRule("joint"), "v": GroupRule("separate"),
       "o": GroupRule("separate"), "down": GroupRule("separate")}
ARCHS = ["llama", "qwen2", "gemma3_text"]  # plain, biases on q/k/v, q/k norms + tied embeddings + softcap-free


def windows(n=8, seqlen=24, seed=3):
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def compressed(arch, ratio=0.4, *, with_result=False):
    model = tiny_model(arch)
    teacher = teacher_copy(model)
    result = jointrank.compress_(model, JointRankConfig(rules=ALL, ratio=ratio), progress=False)
    return (model, teacher, result) if with_result else (model, teacher)


def kl_on(student, teacher, ids) -> float:
    with torch.no_grad():
        s = torch.log_softmax(student(ids).logits.float(), -1)
        t = torch.log_softmax(teacher(ids).logits.float(), -1)
    return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum")) / (ids.numel())


def test_teacher_copy_shares_everything_but_the_decoder_layers():
    model = tiny_model("gemma3_text")
    teacher = teacher_copy(model)
    assert teacher.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, not copied
    assert teacher.model.layers[0].mlp.up_proj.weight is not model.model.layers[0].mlp.up_proj.weight
    jointrank.compress_(model, JointRankConfig(rules=ALL, ratio=0.5), progress=False)
    assert isinstance(teacher.model.layers[0].mlp.up_proj, torch.nn.Linear)  # the teacher stays dense
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_refit_lowers_every_units_error_and_keeps_the_parameter_count(arch):
    model, teacher = compressed(arch)
    before = count_parameters(model)
    report = refit_(model, teacher, windows(), progress=False)
    assert count_parameters(model) == before
    assert report["units"] and all(u["rel_error_after"] <= u["rel_error_before"] + 1e-9 for u in report["units"])
    assert sum(u["rel_error_after"] for u in report["units"]) < sum(u["rel_error_before"] for u in report["units"])


def test_refit_is_the_least_squares_optimum_of_its_first_unit():
    """The refit output factor of layer 0's first unit minimises E‖W x_d - A z‖²: any perturbation costs more."""
    model, teacher = compressed("qwen2")
    ids = windows()
    refit_(model, teacher, ids, progress=False)
    layer_s, layer_t = model.model.layers[0], teacher.model.layers[0]
    captured = {}
    hs = layer_s.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("s", a[0]))
    ht = layer_t.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("t", a[0]))
    with torch.no_grad():
        model(ids)
        teacher(ids)
    hs.remove()
    ht.remove()
    q_s, q_t = layer_s.self_attn.q_proj, layer_t.self_attn.q_proj
    x_c, x_d = captured["s"].reshape(-1, q_s.in_features).double(), captured["t"].reshape(-1, q_s.in_features).double()
    y = x_d @ q_t.weight.double().T + q_t.bias.double()
    z = x_c @ q_s.basis_weight.double().T

    def loss(a, b):
        return float(((y - z @ a.T - b) ** 2).sum().detach())

    a, b = q_s.out.weight.detach().double(), q_s.out.bias.detach().double()
    best = loss(a, b)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        da = torch.randn(a.shape, generator=g, dtype=torch.float64) * 1e-3
        db = torch.randn(b.shape, generator=g, dtype=torch.float64) * 1e-3
        assert loss(a + da, b + db) > best


@pytest.mark.parametrize("arch", ARCHS)
def test_distillation_lowers_the_calibration_loss_and_keeps_the_parameter_count(arch):
    model, teacher = compressed(arch)
    ids = windows()
    before_params, before_kl = count_parameters(model), kl_on(model, teacher, ids)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if n not in {name for name, _ in trainable_factors(model)}}
    report = distill_(model, teacher, ids, DistillSettings(steps=24, lr=1e-3), progress=False)
    assert count_parameters(model) == before_params
    assert kl_on(model, teacher, ids) < 0.8 * before_kl
    assert report.steps_done == 24 and report.loss_last < report.loss_first
    for n, p in model.named_parameters():  # only factors move: embeddings, norms, biases are untouched
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_chunked_kl_gradient_equals_the_unchunked_one():
    model, teacher = compressed("llama")
    ids = windows(1, 24)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    grads = []
    for chunk in (5, 24):
        model.zero_grad()
        with torch.no_grad():
            t_hidden = teacher.get_decoder()(input_ids=ids).last_hidden_state
        loss = _kl_backward(decoder(input_ids=ids).last_hidden_state, t_hidden, head, None, chunk)
        grads.append((loss, model.model.layers[0].mlp.down_proj.out.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("head_dtype", ["float32", "bfloat16"])
def test_the_written_out_kl_gradient_is_autograds(softcap, head_dtype):
    # _kl_backward writes d KL / d logits out (softmax(s) - softmax(t), times the soft cap's slope); autograd through
    # log_softmax and kl_div is the reference, for the loss and for the gradient reaching the student's states
    torch.manual_seed(0)
    head_module = torch.nn.Linear(16, 50, bias=False)
    head = head_in(head_module, head_dtype)
    s_hidden = torch.randn(1, 9, 16, requires_grad=True)
    t_hidden = torch.randn(1, 9, 16) * 2

    def cap(z):
        return torch.tanh(z / softcap) * softcap if softcap else z

    s_logp = torch.log_softmax(cap(head(s_hidden).float()), -1)
    t_logp = torch.log_softmax(cap(head(t_hidden).float()), -1)
    want = torch.nn.functional.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / 9
    want.backward()
    want_grad, s_hidden.grad = s_hidden.grad.clone(), None
    got = _kl_backward(s_hidden * 1.0, t_hidden, head, softcap, chunk=4)
    assert got == pytest.approx(float(want), rel=1e-5)
    tol = 1e-6 if head_dtype == "float32" else 1e-2  # a bfloat16 head rounds the gradient it passes back
    torch.testing.assert_close(s_hidden.grad, want_grad, rtol=tol, atol=tol)


def test_a_bfloat16_head_is_the_same_map_on_bfloat16_copies_and_leaves_the_head_alone():
    model, _ = compressed("gemma3_text")  # tied embeddings: the head's weight is the embedding's
    head = model.get_output_embeddings()
    before = head.weight.detach().clone()
    x = torch.randn(2, 7, head.in_features, requires_grad=True)
    assert head_in(head, "float32") is head  # float32 on a float32 model: the module itself, bit for bit
    y = head_in(head, "bfloat16")(x)
    expected = torch.nn.functional.linear(x.detach().bfloat16(), head.weight.detach().bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 7, head.out_features)
    assert torch.equal(y.detach(), expected)
    torch.testing.assert_close(y.detach().float(), head(x).detach(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()  # the gradient reaches the input (the student's hidden states), not the head
    torch.testing.assert_close(x.grad, head.weight.sum(0).expand_as(x), rtol=2e-2, atol=2e-2)
    assert head.weight.grad is None and torch.equal(head.weight, before)
    assert head_in(model.get_decoder(), "bfloat16") is model.get_decoder()  # not a Linear: used as it is


def test_distilling_with_a_bfloat16_head_follows_the_float32_run_and_is_recorded():
    ids = windows()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model, teacher = compressed("llama")
        before = kl_on(model, teacher, ids)
        report = distill_(model, teacher, ids, DistillSettings(steps=8, lr=1e-3, head_dtype=dtype), progress=False)
        assert report.settings["head_dtype"] == dtype
        assert kl_on(model, teacher, ids) < 0.8 * before  # measured in float32 either way
        losses[dtype] = report.losses
    # the same windows in the same order: per-step losses agree to bfloat16's rounding of the logits
    torch.testing.assert_close(torch.tensor(losses["bfloat16"]), torch.tensor(losses["float32"]), rtol=3e-2, atol=1e-3)
    with pytest.raises(JointRankError, match="--heal-head-dtype must be one of"):
        DistillSettings(head_dtype="float16").check()


def test_distillation_alone_takes_the_dense_states_before_compression_and_never_copies_the_decoder(monkeypatch):
    """healing_reference: for distill, the dense model's own states (no decoder copy), which train exactly the factors
    a teacher copy would; a refit still gets the copy, and is refused the states alone."""
    import jointrank.heal as heal

    ids = windows(n=3)
    calibration = Calibration(ids, "test", 0)
    settings = DistillSettings(steps=4, lr=1e-3)
    with_copy, teacher = compressed("qwen2")
    heal_(with_copy, teacher, calibration, "distill", settings, progress=False)

    model = tiny_model("qwen2")
    monkeypatch.setattr(heal, "teacher_copy", lambda m: pytest.fail("distillation alone copied the decoder"))
    reference = heal.healing_reference(model, calibration, "distill", progress=False)
    assert isinstance(reference, dict) and sorted(reference) == [0, 1, 2]
    jointrank.compress_(model, JointRankConfig(rules=ALL, ratio=0.4), progress=False)
    heal_(model, reference, calibration, "distill", settings, progress=False)
    for (name, x), (_, y) in zip(trainable_factors(with_copy), trainable_factors(model)):
        assert torch.equal(x, y), name
    assert heal.healing_reference(model, calibration, "none") is None
    with pytest.raises(JointRankError, match="a refit needs the dense decoder layers"):
        heal_(model, reference, calibration, "refit", progress=False)
    monkeypatch.undo()
    assert isinstance(heal.healing_reference(tiny_model("qwen2"), calibration, "refit+distill"), torch.nn.Module)


class Interrupt(Exception):
    pass


def test_interrupted_distillation_resumes_to_the_same_factors(tmp_path):
    ids = windows()
    settings = DistillSettings(steps=6, lr=1e-3)
    straight, teacher = compressed("llama")
    distill_(straight, teacher, ids, settings, progress=False)

    resumed, teacher2 = compressed("llama")

    def stop(step, loss):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill_(resumed, teacher2, ids, settings, state_dir=tmp_path, save_every=1, progress=False, on_step=stop)
    fresh, teacher3 = compressed("llama")  # a new process would rebuild the compressed model from scratch
    report = distill_(fresh, teacher3, ids, settings, state_dir=tmp_path, progress=False)
    assert report.resumed_from == 3 and report.steps_done == 6
    for (n, a), (_, b) in zip(trainable_factors(straight), trainable_factors(fresh)):
        assert torch.equal(a, b), n
    with pytest.raises(JointRankError, match="different lr"):
        distill_(fresh, teacher3, ids, DistillSettings(steps=6, lr=5e-4), state_dir=tmp_path, progress=False)
    with pytest.raises(JointRankError, match="different head_dtype"):
        distill_(fresh, teacher3, ids, DistillSettings(steps=6, lr=1e-3, head_dtype="float32"), state_dir=tmp_path,
                 progress=False)


def test_a_healed_checkpoint_reloads_with_the_same_logits(tmp_path):
    model, teacher, result = compressed("qwen2", with_result=True)
    calibration = Calibration(windows(), "random tokens", 3)
    seen = []
    report = heal_(model, teacher, calibration, "refit+distill", DistillSettings(steps=3, lr=1e-3), progress=False,
                   on_step=lambda step, loss: seen.append((step, loss)))
    assert report["refit"]["mean_rel_error_after"] < report["refit"]["mean_rel_error_before"]
    assert seen == list(enumerate(report["distill"]["losses"], 1))  # each step, as reported (a rebuild follows them)
    result.extra["heal"] = report
    jointrank.save(model, None, tmp_path / "healed", result, source="tiny")
    reloaded = jointrank.load(tmp_path / "healed")
    ids = windows(2, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- self-generated text


def test_calibration_spec():
    assert parse_spec("self") == 16384 and parse_spec("self:2048") == 2048
    assert parse_spec("data/c4.txt") is None and parse_spec(None) is None
    with pytest.raises(JointRankError, match="whole number"):
        parse_spec("self:many")


def test_nucleus_sampling_never_leaves_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * 5000]).clamp_min(1e-12))
    g = torch.Generator().manual_seed(0)
    drawn = {int(_sample(logits, 1.0, 0.9, g)) for _ in range(400)}
    assert drawn == {0, 1, 2}  # 0.5 + 0.3 < 0.9, so token 2 is in; 0.95 ≥ 0.9 already, so token 3 is out
    flat = torch.zeros(2, 10000)  # no short nucleus: the full sort path, 90% of a uniform distribution
    picks = torch.stack([_sample(flat, 1.0, 0.9, g) for _ in range(200)])
    assert picks.max() < 10000 and picks.unique().numel() > 150


def test_dtype_round_trip_is_bit_exact():
    model = tiny_model("llama")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    restore = _to_dtype(model, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    restore()
    for n, t in model.state_dict().items():
        assert t.dtype == before[n].dtype and torch.equal(t, before[n]), n


class TinyTokenizer:
    bos_token_id, eos_token_id = 1, 2

    def __len__(self):
        return 96


def test_self_calibration_is_seeded_cached_and_starts_documents_with_bos(tmp_path):
    model = tiny_model("llama")
    settings = SamplingSettings(seqlen=20, batch_size=3)
    cal = self_calibration(model, TinyTokenizer(), 100, settings=settings, cache_dir=tmp_path, progress=False)
    assert tuple(cal.input_ids.shape) == (5, 20) and cal.source == "self:100"
    assert (cal.input_ids[:, 0] == 1).all()
    after_eos = cal.input_ids[:, 1:][cal.input_ids[:, :-1] == 2]
    assert (after_eos == 1).all()  # a finished document is followed by a new one
    assert not cal.provenance["from_cache"]
    again = self_calibration(model, TinyTokenizer(), 100, settings=settings, cache_dir=tmp_path, progress=False)
    assert again.provenance["from_cache"] and torch.equal(again.input_ids, cal.input_ids)
    fresh = self_calibration(model, TinyTokenizer(), 100, settings=settings, cache_dir=tmp_path / "other",
                             progress=False)
    assert torch.equal(fresh.input_ids, cal.input_ids)  # seeded: the same text without the cache
    other_seed = self_calibration(model, TinyTokenizer(), 100, settings=SamplingSettings(seqlen=20, seed=1),
                                  cache_dir=tmp_path, progress=False)
    assert not torch.equal(other_seed.input_ids, cal.input_ids)
    Path = type(tmp_path)
    Path(cal.provenance["cache_file"]).write_bytes(b"truncated")  # a broken cache is regenerated, not trusted
    redone = self_calibration(model, TinyTokenizer(), 100, settings=settings, cache_dir=tmp_path, progress=False)
    assert not redone.provenance["from_cache"] and torch.equal(redone.input_ids, cal.input_ids)


def loop_trips(doc: list[int], window: int, share: float) -> list[int]:
    """Brute force: the indices at which a document's last `window` 4-grams hold at least `share` repeats of an
    earlier 4-gram of the document (the guard's rule, recomputed from scratch at every token)."""
    trips = []
    for end in range(4, len(doc) + 1):
        grams = [tuple(doc[i:i + 4]) for i in range(end - 3)]
        if len(grams) < window:
            continue
        repeats = [g in grams[:i] for i, g in enumerate(grams)]
        if sum(repeats[-window:]) >= share * window:
            trips.append(end - 1)
    return trips


@pytest.mark.parametrize("seed", range(6))
def test_loop_guard_trips_exactly_where_the_brute_force_rule_first_holds(seed):
    g = torch.Generator().manual_seed(seed)
    prose = (torch.randint(3, 90, (int(torch.randint(0, 40, (1,), generator=g)),), generator=g)).tolist()
    period = int(torch.randint(1, 7, (1,), generator=g))
    cycle = torch.randint(3, 90, (period,), generator=g).tolist()
    doc = prose + cycle * (60 // period + 2)  # text, then a loop long enough to trip a 16-gram window
    guard, fired = LoopGuard(16, 0.9, bos=1), None
    for i, token in enumerate(doc):
        if guard.push(token):
            fired = i
            break
    expected = loop_trips(doc, 16, 0.9)
    assert expected and fired == expected[0]
    # after tripping, the guard has forgotten the document: the same loop must be seen again to trip it
    assert not any(guard.push(t) for t in cycle * 3)
    assert not LoopGuard(0, 0.9, bos=1).push(doc[-1])  # window 0: the guard is off


def test_self_calibration_guard_ends_looping_documents_and_records_it(tmp_path):
    model = tiny_model("llama")  # greedy sampling of a random model falls into a loop at once
    off = SamplingSettings(seqlen=80, batch_size=3, temperature=0.0, loop_window=0, isolate_documents=False,
                           max_repeated_share=1.0, dtype="float32")
    on = SamplingSettings(seqlen=80, batch_size=3, temperature=0.0, loop_window=16, loop_share=0.9,
                          max_repeated_share=1.0, dtype="float32")  # no redrawing: every window is checked
    loops = self_calibration(model, TinyTokenizer(), 240, settings=off, cache_dir=tmp_path, progress=False)
    assert all(repeated_ngram_share(w.tolist()) > 0.5 for w in loops.input_ids)  # the precondition: it loops
    assert loops.provenance["loop_windows"] == 3 and "loop_restarts" not in loops.provenance
    # off: the cache key written before the guards existed
    assert not {"loop_window", "isolate_documents", "max_repeated_share", "windows_redrawn"} & set(loops.provenance)
    cal = self_calibration(model, TinyTokenizer(), 240, settings=on, cache_dir=tmp_path, progress=False)
    restarts = 0
    for window in cal.input_ids.tolist():
        starts = [i for i, t in enumerate(window) if t == 1] + [len(window)]
        for a, b in zip(starts, starts[1:]):
            doc = window[a + 1:b]
            trips = loop_trips(doc, 16, 0.9)
            # the guard's rule held nowhere in a document but at its last token, where it ended the document
            assert trips in ([], [len(doc) - 1]) and (not trips or b < len(window))
            restarts += bool(trips)
    assert restarts > 0 and cal.provenance["loop_restarts"] == restarts
    assert cal.provenance["loop_window"] == 16
    again = self_calibration(model, TinyTokenizer(), 240, settings=on, cache_dir=tmp_path, progress=False)
    assert again.provenance["from_cache"] and again.provenance["loop_restarts"] == restarts


def test_windows_still_mostly_repetition_are_drawn_again(tmp_path, capsys):
    model = tiny_model("llama")
    # sampled at temperature 1 the random model never loops: redrawing changes nothing, and costs nothing
    plain = SamplingSettings(seqlen=40, batch_size=2, dtype="float32", max_repeated_share=1.0)
    checked = SamplingSettings(seqlen=40, batch_size=2, dtype="float32")
    a = self_calibration(model, TinyTokenizer(), 200, settings=plain, cache_dir=tmp_path, progress=False)
    b = self_calibration(model, TinyTokenizer(), 200, settings=checked, cache_dir=tmp_path, progress=False)
    assert torch.equal(a.input_ids, b.input_ids) and b.provenance["windows_redrawn"] == 0
    assert a.provenance["cache_file"] != b.provenance["cache_file"]  # the check is in the cache key
    # greedy, it loops in every window: drawn again up to the limit (3x), then the least repetitive are kept
    greedy = SamplingSettings(seqlen=80, batch_size=2, dtype="float32", temperature=0.0, loop_window=0,
                              max_repeated_share=0.5, redraw_limit=3.0)
    stats = {}
    ids = sample_windows(model, TinyTokenizer(), 5, 80, greedy, progress=False, stats=stats)
    assert tuple(ids.shape) == (5, 80) and stats["windows_redrawn"] == 15
    cal = self_calibration(model, TinyTokenizer(), 400, settings=greedy, cache_dir=tmp_path, progress=False)
    assert cal.provenance["windows_redrawn"] == 15 and cal.provenance["loop_windows"] == 5
    assert "5 of 5 self-generated windows are still mostly repetition" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_isolated_documents_are_sampled_as_if_alone(arch):
    """Greedy sampling from BOS is deterministic, so documents that see nothing before their BOS all repeat the
    first one; documents that see the earlier ones in their window (the old sampling) drift from it."""
    model = tiny_model(arch)

    def complete_documents(isolate: bool) -> list[set]:
        settings = SamplingSettings(seqlen=120, batch_size=3, temperature=0.0, loop_window=16,
                                    isolate_documents=isolate, dtype="float32")
        ids = sample_windows(model, TinyTokenizer(), 3, 120, settings, progress=False)
        out = []
        for window in ids.tolist():
            starts = [i for i, t in enumerate(window) if t == 1] + [len(window)]
            out.append({tuple(window[a:b]) for a, b in zip(starts[:-2], starts[1:-1])})  # the last may be cut
        return out

    isolated = complete_documents(True)
    assert all(len(docs) == 1 for docs in isolated)
    assert all(len(docs) > 1 for docs in complete_documents(False))  # the precondition: context matters


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_compresses_and_heals_with_no_user_data(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JOINTRANK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "healed"
    code = main(["compress", str(model_dir), "--qk", "joint", "--gate-up", "joint", "--target", "0.2", "--scope",
                 "decoder", "--method", "svd_llm", "--calibration", "self:96", "--heal", "refit+distill",
                 "--heal-steps", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "jointrank_manifest.json").read_text())
    extra = manifest["result"]["extra"]
    assert extra["calibration_provenance"]["kind"] == "self-generated"
    assert extra["heal"]["kind"] == "refit+distill" and extra["heal"]["distill"]["steps_done"] == 3
    assert extra["heal"]["distill"]["settings"]["head_dtype"] == "bfloat16"  # the default, recorded
    assert not (tmp_path / ".healed.heal").exists()  # the resume state is gone once the checkpoint is complete
    before = manifest["result"]["params"]
    assert count_parameters(jointrank.load(out)) == before["total_after"]


@pytest.mark.parametrize("extra,message", [
    (["--heal", "refit"], "--heal refit needs calibration text"),
    (["--heal", "distill", "--calibration", "self:lots"], "whole number of tokens"),
    (["--heal", "distill", "--calibration", "self", "--heal-steps", "0"], "--heal-steps must be positive"),
    (["--heal", "distill", "--calibration", "self:64", "--calibration-tokens", "64"], "give the number"),
    (["--calibration", "self"], "data-free and takes no --calibration"),
    (["--heal", "refit", "--calibration", "self", "--stream"], "need the whole model in memory"),
])
def test_cli_refuses_bad_healing_flags_in_one_line(model_dir, tmp_path, capsys, extra, message):
    code = main(["compress", str(model_dir), "--qk", "joint", "--ratio", "0.5", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_plan_estimates_every_phase_it_will_run(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JOINTRANK_CACHE", str(tmp_path / "cache"))
    args = ["plan", str(model_dir), "--qk", "joint", "--ratio", "0.5", "--method", "svd_llm"]
    assert main(args + ["--calibration", "self:64", "--heal", "refit+distill", "--heal-steps", "5"]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("estimated time")][0]
    assert "healing trains" in out and "GiB to the compressed model's memory" in out
    for phase in ("sampling", "statistics", "factorisation", "refit", "distillation"):
        assert phase in line
    assert not (tmp_path / "cache").exists()  # planning samples a few steps to time them, and caches nothing
    assert main(args[:4] + ["--ratio", "0.5"]) == 0  # data-free, no healing: only the factorisation is estimated
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("estimated time")][0]
    assert "factorisation" in line and "sampling" not in line and "distillation" not in line
    assert "healing trains" not in out
    # loss-aware allocation: compress plans again from a backward pass and loss curves before it factorises
    loss = ["plan", str(model_dir), "--qk", "joint", "--target", "0.1", "--scope", "decoder",
            "--method", "svd_llm", "--allocation", "loss"]
    assert main(loss + ["--calibration", "self:64"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("estimated time")][0]
    assert "loss planning" in line and "statistics" in line


def test_statistics_are_estimated_once_per_group_input_not_per_unit():
    """Separate Q and K read one input: one second moment per (layer, group), as methods.apply accumulates."""
    from jointrank import plan_for
    from jointrank.estimate import _watched_widths

    model = tiny_model("llama", num_hidden_layers=3)
    plan = plan_for(model, JointRankConfig(rules={"qk": GroupRule("separate"), "gate_up": GroupRule("joint")},
                                           ratio=0.25))
    entries = list(plan.factorised)
    assert len(entries) == 3 * 3  # q, k and gate/up per layer
    hidden = model.config.hidden_size
    assert sorted(_watched_widths(entries)) == [hidden] * 6


@pytest.mark.parametrize("arch,share_layers", [("llama", 1), ("qwen2", 1), ("gemma3_text", 1), ("llama", 2)])
def test_plan_counts_the_factors_distillation_trains_and_their_optimiser_memory(arch, share_layers):
    """distillation_memory's count, from the plan alone, is the number of parameters heal trains (a basis shared
    across layers once); Adam adds two moments and a gradient per parameter."""
    from jointrank import plan_for
    from jointrank.estimate import distillation_memory

    model = tiny_model(arch, num_hidden_layers=4)
    plan = plan_for(model, JointRankConfig(rules=ALL, ratio=0.4, share_layers=share_layers))
    assert max(e.span for e in plan.factorised) == share_layers
    jointrank.compress_(model, plan, progress=False)
    trainable, extra = distillation_memory(plan)
    assert trainable == sum(p.numel() for _, p in trainable_factors(model)) > 0
    assert extra == 12 * trainable and distillation_memory(plan, element_bytes=2)[1] == 6 * trainable


def test_distilling_from_teacher_states_is_distilling_from_the_teacher_and_the_teacher_can_be_freed():
    """The teacher's hidden states, computed once per window, train the very same factors as the teacher run at every
    step; heal_(release_teacher=True) frees the teacher's decoder copy and changes nothing in the result."""
    from jointrank.heal import teacher_states

    ids = windows(n=3)
    settings = DistillSettings(steps=5, lr=1e-3)  # 5 steps over 3 windows: two are seen twice
    a, teacher_a = compressed("qwen2")
    distill_(a, teacher_a, ids, settings, progress=False)
    b, teacher_b = compressed("qwen2")
    distill_(b, teacher_states(teacher_b, ids, progress=False), ids, settings, progress=False)
    for (name, x), (_, y) in zip(trainable_factors(a), trainable_factors(b)):
        assert torch.equal(x, y), name
    c, teacher_c = compressed("qwen2")
    layer_params = sum(p.numel() for p in teacher_c.model.layers.parameters())
    heal_(c, teacher_c, Calibration(ids, "test", 0), "distill", settings, progress=False, release_teacher=True)
    assert layer_params > 0 and all(p.is_meta for p in teacher_c.model.layers.parameters())
    assert not any(p.is_meta for p in c.parameters())  # the student keeps everything it shares with the teacher
    for (name, x), (_, y) in zip(trainable_factors(a), trainable_factors(c)):
        assert torch.equal(x, y), name
