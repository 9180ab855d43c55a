"""Healing: recover, from the dense model itself, quality that truncation lost. The parameter count never changes.

Two kinds, applied after factorisation to a compressed model (the student) with the dense model as reference
(the teacher), on calibration windows (a text file, or text sampled from the dense model: no user data):

* `refit_` (closed form, seconds): layer by layer, every factorised unit keeps its input basis B and gets new
  output factors A_i (and biases) by least squares, so that A_i B x_c + b_i reproduces W_i x_d, the dense
  layer's output on the *dense* model's input x_d, from the input x_c the compressed model actually produces at that
  point (layers before it already compressed and refitted). Each layer therefore also corrects, as far as its
  rank allows, the error that earlier layers passed on. The solution of min_A E‖W x_d - A z‖², z = B x_c, is
  A = E[W x_d zᵀ] E[z zᵀ]⁻¹ (ridge-damped), accumulated in float64.
* `distill_` (gradient steps, minutes): all factors (bases and output factors; nothing else) trained with Adam on
  KL(teacher ‖ student) over the full next-token distributions, one window per step, with a step and time budget,
  a progress bar showing the loss, and a state file from which an interrupted run resumes exactly.

What they need from the dense model is taken before compression (`healing_reference`): a refit runs the dense
decoder layers, so `teacher_copy` makes a copy of them that shares everything else (embeddings, norms outside the
layers) with the model to be compressed; distillation only compares final hidden states, so for it alone the dense
model's states on the calibration windows are kept (a few MB) and no copy of the decoder is made.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .architectures import decoder_layers
from .errors import JointRankError
from .modules import LowRankLinear, SharedBasis

HEAL_KINDS = ("none", "refit", "distill", "refit+distill")
HEAD_DTYPES = ("bfloat16", "float32")
QUANTIZED_STEPS = 32  # the CLI's --heal-quantized-steps with --quantize (results/quantize.md measures it)
REFIT_RIDGE = 1e-6  # relative to the mean eigenvalue of E[z zᵀ]: keeps the solve stable on tiny calibration sets


def parse_heal(spec: str | None) -> tuple[bool, bool]:
    """'refit+distill' -> (refit, distill) flags; one clear error for anything else."""
    spec = (spec or "none").strip()
    if spec not in HEAL_KINDS:
        raise JointRankError(f"unknown --heal {spec!r}; choose one of {', '.join(HEAL_KINDS)}")
    return "refit" in spec, "distill" in spec


def check_quantized_steps(spec: str, quantized_steps: int | None, quantize: str | None) -> None:
    """--heal-quantized-steps trains through --quantize's rounding: refused without both a scheme and distillation."""
    if quantized_steps and (quantize is None or not parse_heal(spec)[1]):
        raise JointRankError("--heal-quantized-steps trains the factors as --quantize will store them: it needs "
                             "--quantize SCHEME and --heal distill (or refit+distill)")


def check_heal(spec: str, distill: "DistillSettings | None") -> None:
    """The healing kind and, for distillation, its settings: refused before any work."""
    parse_heal(spec)
    if distill is not None:
        distill.check()


def teacher_copy(model: nn.Module) -> nn.Module:
    """A dense copy of `model` to heal against: the decoder layers are copied, every other tensor is shared
    (compression replaces modules inside the layers only, so the shared parts stay identical)."""
    _, layers = decoder_layers(model)
    in_layers = {id(t) for t in list(layers.parameters()) + list(layers.buffers())}
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in in_layers}
    teacher = copy.deepcopy(model, memo)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def healing_reference(model: nn.Module, calibration, kind: str, *, progress: bool = True) -> "nn.Module | dict | None":
    """What healing of kind `kind` needs from the dense model, taken before compression changes it: None without
    healing; for distillation alone, the dense model's last hidden states on the calibration windows (teacher_states:
    a few MB per window, and no copy of the decoder is ever made); for a refit, a dense copy of the decoder layers
    (teacher_copy), which it runs layer by layer. heal_ takes either."""
    do_refit, do_distill = parse_heal(kind)
    if not (do_refit or do_distill):
        return None
    _require_calibration(kind, calibration)
    if do_refit:
        return teacher_copy(model)
    return teacher_states(model, calibration.input_ids, progress=progress)


def _require_calibration(kind: str, calibration) -> None:
    if calibration is None:
        raise JointRankError(f"--heal {kind} needs calibration text (--calibration FILE or --calibration self)")


def _low_rank_modules(layer: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, LowRankLinear)}


def _output(result):
    return result[0] if isinstance(result, tuple) else result


# ----------------------------------------------------------------------------------------------------------- refit


@torch.no_grad()
def refit_(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, *, progress: bool = True) -> dict:
    """Refit every factorised unit's output factors and biases in place (see the module docstring).

    Returns per unit the relative output error E‖W x_d - y‖² / E‖W x_d‖² before and after, on the calibration
    windows (the quantity the refit minimises, so "after" never exceeds "before" up to the ridge).
    """
    from .methods.calibration import capture_layer_inputs

    _, s_layers = decoder_layers(student)
    _, t_layers = decoder_layers(teacher)
    if len(s_layers) != len(t_layers):
        raise JointRankError("the teacher and the compressed model have different depths")
    student.eval()
    hidden, kwargs = capture_layer_inputs(teacher, input_ids)  # the embeddings are shared, so the same for both
    h_s, h_t = list(hidden), list(hidden)
    report = []
    targets = [i for i, layer in enumerate(s_layers) if _low_rank_modules(layer)]
    last = max(targets) if targets else -1
    bar = tqdm(total=len(targets), desc="healing: refit", unit="layer", disable=not progress or not targets)
    try:
        for index, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers)):
            if index > last:
                break
            units = _low_rank_modules(s_layer)
            if units:
                report.extend(_refit_layer(s_layer, t_layer, units, h_s, h_t, kwargs[index], index))
                bar.update()
            h_t = [_output(t_layer(x, **kwargs[index])) for x in h_t]
            h_s = [_output(s_layer(x, **kwargs[index])) for x in h_s]
    finally:
        bar.close()
    return {"units": report, "windows": int(input_ids.shape[0]), "tokens": int(input_ids.numel())}


def _refit_layer(s_layer, t_layer, units: dict[str, LowRankLinear], h_s, h_t, kw, index) -> list[dict]:
    """Least-squares refit of one layer's units from second moments of their inputs.

    With x̃_d = [x_d; 1] (the dense input, and the dense bias as a column of W̃ = [W, b]) and z = [B x_c; 1] (the
    compressed input projected on the kept basis, and the bias), everything the refit needs is three moments:
    S_dd = E[x̃_d x̃_dᵀ], S_dz = E[x̃_d zᵀ], S_zz = E[z zᵀ]. Then A = W̃ S_dz S_zz⁻¹, and the output errors before
    and after follow from the same moments. They are d_in-sized (not d_out-sized) and shared by all units reading
    one input, so a layer costs a few small products per window. Each window's products are float32 (512 tokens),
    their running sums float64."""
    captured: dict[tuple[str, str], torch.Tensor] = {}

    def grab(key):
        def hook(module, args):
            captured[key] = args[0].detach()
        return hook

    def ones(x):
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)

    handles = []
    for name in units:
        handles.append(s_layer.get_submodule(name).register_forward_pre_hook(grab(("s", name))))
        handles.append(t_layer.get_submodule(name).register_forward_pre_hook(grab(("t", name))))
    stats: dict[str, list] = {}
    try:
        for xs, xt in zip(h_s, h_t):
            captured.clear()
            t_layer(xt, **kw)
            s_layer(xs, **kw)
            memo: dict = {}  # products shared by units reading the same input (and basis) in this window
            for name, module in units.items():
                x_c, x_d = captured[("s", name)], captured[("t", name)]
                basis = module.basis_weight
                kd = ("dd", x_d.data_ptr())
                kz = ("dz", x_d.data_ptr(), x_c.data_ptr(), basis.data_ptr())
                if kd not in memo:
                    xd = ones(x_d.reshape(-1, module.in_features).float())
                    memo[kd] = (xd, (xd.T @ xd).double())
                xd, dd = memo[kd]
                if kz not in memo:
                    z = ones(x_c.reshape(-1, module.in_features).float() @ basis.detach().float().T)
                    memo[kz] = ((xd.T @ z).double(), (z.T @ z).double())
                dz, zz = memo[kz]
                acc = stats.setdefault(name, [0, 0, 0])
                acc[0], acc[1], acc[2] = acc[0] + dd, acc[1] + dz, acc[2] + zz
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, module in units.items():
        dd, dz, zz = stats[name]
        dense = t_layer.get_submodule(name)
        w = dense.weight.detach().double()
        bias = dense.bias.detach().double() if dense.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        w = torch.cat([w, bias[:, None]], dim=1)  # W̃ = [W, b]
        cross = w @ dz  # E[y zᵀ] (d_out, k+1)
        yy = float(torch.einsum("ij,jk,ik->", w, dd, w))

        def residual(a):  # E‖y - a z‖², from the moments
            return yy - 2 * float((a * cross).sum()) + float(torch.einsum("ik,kl,il->", a, zz, a))

        old_bias = module.bias.detach().double() if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        old = torch.cat([module.out.weight.detach().double(), old_bias[:, None]], dim=1)
        if module.bias is None:  # no bias to refit: solve without the constant column of z
            cross, zz = cross[:, :-1], zz[:-1, :-1]
            old = old[:, :-1]
        k = zz.shape[0]
        ridge = REFIT_RIDGE * float(torch.trace(zz)) / k
        solution = torch.linalg.solve(zz + ridge * torch.eye(k, dtype=zz.dtype), cross.T).T  # (d_out, k [+1])
        if not torch.isfinite(solution).all():
            raise JointRankError(f"healing (refit) produced non-finite factors for layer {index} {name}")
        before, after = residual(old), residual(solution)
        module.out.weight.copy_(solution[:, : module.rank].to(module.out.weight.dtype))
        if module.bias is not None:
            module.out.bias.copy_(solution[:, module.rank].to(module.out.bias.dtype))
        out.append({"layer": index, "module": name, "rank": module.rank,
                    "rel_error_before": math.sqrt(max(before, 0.0) / yy) if yy > 0 else 0.0,
                    "rel_error_after": math.sqrt(max(after, 0.0) / yy) if yy > 0 else 0.0})
    return out


# -------------------------------------------------------------------------------------------------------- distill


@dataclass
class DistillSettings:
    steps: int = 100  # optimizer steps, one window each
    # 3e-5, not the 1e-4 of the first measurements: on Gemma-3-270M at 10% of the decoder, 1e-4 mostly taught the
    # model windows that start without BOS (1.88x dense on windows started with BOS, zero-shot 91.7% kept) where 3e-5
    # reached 1.60x and kept 94.7% (results/heal_zeroshot.md, results/quality.md)
    lr: float = 3e-5
    max_minutes: float | None = None  # stop (and save) when this much wall time has passed
    seed: int = 0  # window order
    clip: float = 1.0  # gradient-norm clip
    # positions whose full logits are materialised at once (memory, not results): on Gemma-3-270M 64 instead of 128
    # lowers distillation's peak by ~0.2-0.3 GiB for a few % more time per step (results/distill_memory.md)
    loss_chunk: int = 64
    # precision of the frozen LM head's matmuls (teacher and student logits, and the gradient through the head).
    # The head is most of a step on large-vocabulary models (Gemma: 262k x 640, three matmuls per window); a
    # bfloat16 copy of its weight, made once, runs them 2-3x faster on CPUs with bf16 instructions and on GPUs.
    # Softmax and KL stay float32. results/distill_precision.md measures what it changes.
    head_dtype: str = "bfloat16"
    # with a quantisation scheme (heal_'s `quantize`): after the float steps, this many more with every weight the
    # scheme will store seen as stored (quantize.fake_quantize_: rounded on the grid it is saved on, the gradient
    # passed straight through), so the factors learn to serve the teacher *after* rounding
    quantized_steps: int = 0

    def check(self) -> None:
        """One clear error for a setting that cannot run (the CLI's flags name them)."""
        if self.steps < 1:
            raise JointRankError(f"--heal-steps must be positive (got {self.steps})")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise JointRankError(f"--heal-minutes must be positive (got {self.max_minutes})")
        if not self.lr > 0:
            raise JointRankError(f"--heal-lr must be positive (got {self.lr})")
        if self.quantized_steps < 0:
            raise JointRankError(f"--heal-quantized-steps must be 0 or more (got {self.quantized_steps})")
        if self.head_dtype not in HEAD_DTYPES:
            raise JointRankError(f"--heal-head-dtype must be one of {', '.join(HEAD_DTYPES)} (got {self.head_dtype!r})")


@dataclass
class DistillReport:
    settings: dict
    steps_done: int
    stopped: str  # "steps" | "time"
    seconds: float
    tokens: int
    loss_first: float | None
    loss_last: float | None  # mean of the last few steps
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0


def trainable_factors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every factor of every low-rank unit, each once (a shared basis is one parameter), in a fixed order."""
    seen, out = set(), []
    for name, module in model.named_modules():
        if isinstance(module, (LowRankLinear, SharedBasis)):
            for pname, p in module.named_parameters(recurse=True):
                if pname.endswith("bias") or id(p) in seen:
                    continue
                seen.add(id(p))
                out.append((f"{name}.{pname}", p))
    return out


def _window_order(n: int, steps: int, seed: int) -> list[int]:
    """Window index of every step: seeded permutations, one per pass over the windows."""
    order: list[int] = []
    g = torch.Generator().manual_seed(seed)
    while len(order) < steps:
        order.extend(torch.randperm(n, generator=g).tolist())
    return order[:steps]


def _split(model):
    from .evaluate.perplexity import split_model

    parts = split_model(model)
    if parts is None:
        raise JointRankError("distillation needs a model with a separate decoder and LM head (get_decoder)")
    return parts


def head_in(head: nn.Module, dtype: str):
    """The LM head as distillation runs it: `head` itself, or, when it is a plain Linear in another dtype, the same
    map through a `dtype` copy of its weight (the head is frozen during distillation, so the copy is made once).
    Inputs are cast to `dtype`; the logits come back in it (callers take them to float32 for the softmax)."""
    dt = getattr(torch, dtype)
    if not isinstance(head, nn.Linear) or head.weight.dtype == dt:
        return head
    weight = head.weight.detach().to(dt)
    bias = None if head.bias is None else head.bias.detach().to(dt)

    def run(x):  # as a 2-D matmul: a 3-D one copies the weight for every call of its backward in bfloat16
        return F.linear(x.reshape(-1, x.shape[-1]).to(dt), weight, bias).reshape(*x.shape[:-1], -1)

    return run


def _kl_backward(s_hidden: torch.Tensor, t_hidden: torch.Tensor, head, softcap, chunk: int) -> float:
    """Mean per-token KL(teacher ‖ student) over the window; its gradient flows into s_hidden's graph. Full logits
    are materialised `chunk` positions at a time (Gemma's vocabulary is 262k), so memory stays small.

    The gradient of the KL with respect to the student's logits is written out, softmax(s) - softmax(t) (times the
    soft cap's derivative 1 - (logits / cap)^2 when the model has one), instead of being taken by autograd through
    log_softmax and kl_div: autograd would keep the logits, the student's log-probabilities and the KL's terms
    alive for the backward. Only the head's own backward (its matmul) goes through autograd. Equal to the autograd
    computation to float rounding (tests/test_heal.py)."""
    from .evaluate.perplexity import soft_cap

    leaf = s_hidden.detach()
    n = leaf.shape[0] * leaf.shape[1]
    grad = torch.empty_like(leaf)
    total = 0.0
    for start in range(0, leaf.shape[1], chunk):
        part = slice(start, start + chunk)
        x = leaf[:, part].detach().requires_grad_(True)
        out = head(x)  # the head's graph only
        with torch.no_grad():
            t_logp = F.log_softmax(soft_cap(head(t_hidden[:, part]).float(), softcap), dim=-1)
            logits = soft_cap(out.detach().float(), softcap)
            cap_slope = 1 - (logits / softcap) ** 2 if softcap else None
            s_logp = F.log_softmax(logits, dim=-1)
            del logits
            t_p = t_logp.exp()
            # KL = Σ p_t (log p_t - log p_s), in place in t_logp's buffer; torch's sum, not a BLAS dot product,
            # whose float32 accumulation over 128 x 262k terms was off by ~1e-3 relative on Gemma-3-270M
            total += float(t_logp.sub_(s_logp).mul_(t_p).sum()) / n
            del t_logp
            g = s_logp.exp_().sub_(t_p).div_(n)  # d KL / d student logits, in place of the log-probabilities
            del t_p
            if cap_slope is not None:
                g.mul_(cap_slope)
                del cap_slope
        out.backward(g.to(out.dtype))
        del out, g, s_logp
        grad[:, part] = x.grad
    s_hidden.backward(grad)
    return total


@torch.no_grad()
def teacher_states(teacher: nn.Module, input_ids: torch.Tensor, windows=None, *, progress: bool = True) -> dict:
    """{window index: the teacher decoder's last hidden state on that window} for `windows` (default: all).

    Distillation compares against these only, and the teacher is deterministic: one pass over the windows replaces
    a teacher forward per step (a 100-step run over 32 windows does 32 instead of 100), and the teacher's decoder can
    be freed before training starts (heal_(release_teacher=True)). A few MB per window."""
    decoder_t, _, _ = _split(teacher)
    was_training = teacher.training
    teacher.eval()
    device = next(decoder_t.parameters()).device
    indices = sorted(set(range(int(input_ids.shape[0])) if windows is None else windows))
    try:
        return {i: decoder_t(input_ids=input_ids[i].unsqueeze(0).to(device), use_cache=False).last_hidden_state
                for i in tqdm(indices, desc="healing: teacher", unit="window", disable=not progress)}
    finally:
        teacher.train(was_training)


def release_teacher_(teacher: nn.Module) -> None:
    """Free the teacher's own copy of the decoder layers (moved to the meta device); the tensors it shares with the
    student (embeddings, head, final norm) are untouched. The teacher cannot be run afterwards."""
    _, layers = decoder_layers(teacher)
    layers.to("meta")


def distill_(student: nn.Module, teacher: "nn.Module | dict", input_ids: torch.Tensor, settings: DistillSettings, *,
             state_dir: str | Path | None = None, save_every: int = 10, progress: bool = True,
             on_step=None, desc: str = "healing: distill") -> DistillReport:
    """Train the student's factors against the teacher (see the module docstring); returns what was done.

    `teacher`: the dense model, or its teacher_states on these windows (computed here otherwise; heal_ computes
    them itself, so it can free the teacher's decoder copy before training).

    With `state_dir`, the trainable tensors, Adam's moments and the step are saved there every `save_every` steps
    (safetensors + JSON, written atomically), and a later call with the same settings and windows continues from
    the last saved step: the result is the same as an uninterrupted run. on_step(step, loss) is called after each
    step (tests use it to interrupt a run).
    """
    if settings.steps < 1:
        raise JointRankError(f"--heal-steps must be positive (got {settings.steps})")
    params = trainable_factors(student)
    if not params:
        raise JointRankError("nothing to heal: the model has no factorised units")
    decoder_s, head_s, softcap = _split(student)
    head_s = head_in(head_s, settings.head_dtype)
    order = _window_order(int(input_ids.shape[0]), settings.steps, settings.seed)
    states = teacher if isinstance(teacher, dict) else teacher_states(teacher, input_ids, order, progress=progress)
    frozen = {id(p) for _, p in params}
    previous = {}
    for p in student.parameters():
        previous[p] = p.requires_grad
        p.requires_grad_(id(p) in frozen)
    optimizer = torch.optim.Adam([p for _, p in params], lr=settings.lr)
    key = _state_key(settings, input_ids, params)
    start_step, losses = 0, []
    if state_dir is not None:
        start_step, losses = _load_state(Path(state_dir), key, params, optimizer)
    device = params[0][1].device
    started = time.perf_counter()
    stopped = "steps"
    was_training = student.training
    student.eval()  # no dropout: the factors are trained, the model is not put in training mode
    bar = tqdm(total=settings.steps, initial=start_step, desc=desc, unit="step",
               disable=not progress)
    step = start_step
    try:
        for step in range(start_step, settings.steps):
            if settings.max_minutes is not None and time.perf_counter() - started > settings.max_minutes * 60:
                stopped = "time"
                break
            window = input_ids[order[step]].unsqueeze(0).to(device)
            s_hidden = decoder_s(input_ids=window, use_cache=False).last_hidden_state
            loss = _kl_backward(s_hidden, states[order[step]], head_s, softcap, settings.loss_chunk)
            if settings.clip:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], settings.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            bar.set_postfix(kl=f"{loss:.4f}", avg10=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
            bar.update()
            if state_dir is not None and (step + 1) % save_every == 0:
                _save_state(Path(state_dir), key, params, optimizer, step + 1, losses)
            if on_step is not None:
                on_step(step + 1, loss)
        else:
            step = settings.steps
    finally:
        bar.close()
        for p, flag in previous.items():
            p.requires_grad_(flag)
        student.train(was_training)
    done = step if stopped == "time" else settings.steps
    if state_dir is not None:
        _save_state(Path(state_dir), key, params, optimizer, done, losses)
    tail = losses[-10:]
    return DistillReport(settings=asdict(settings), steps_done=done, stopped=stopped,
                         seconds=time.perf_counter() - started, tokens=done * int(input_ids.shape[1]),
                         loss_first=losses[0] if losses else None,
                         loss_last=sum(tail) / len(tail) if tail else None, losses=losses, resumed_from=start_step)


STATE_TENSORS = "distill_state.safetensors"
STATE_JSON = "distill_state.json"


def _state_key(settings: DistillSettings, input_ids: torch.Tensor, params) -> dict:
    """What must match for a saved state to be continued: the settings that shape the run (not the budget), the
    windows and the trainable tensors' names and shapes."""
    import hashlib

    digest = hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"lr": settings.lr, "seed": settings.seed, "clip": settings.clip, "head_dtype": settings.head_dtype,
            "windows": digest,
            "params": [[n, list(p.shape)] for n, p in params], "threads": torch.get_num_threads()}


def _save_state(state_dir: Path, key: dict, params, optimizer, step: int, losses: list[float]) -> None:
    from safetensors.torch import save_file

    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params}
    for i, (n, p) in enumerate(params):
        st = optimizer.state.get(p)
        if st:
            tensors[f"exp_avg/{n}"] = st["exp_avg"].cpu().contiguous()
            tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].cpu().contiguous()
            tensors[f"adam_step/{n}"] = torch.as_tensor(st["step"]).reshape(1).float().cpu()
    tmp = state_dir / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, state_dir / STATE_TENSORS)
    tmp = state_dir / f".{STATE_JSON}.tmp"
    tmp.write_text(json.dumps({"key": key, "step": step, "losses": losses}))
    os.replace(tmp, state_dir / STATE_JSON)  # written last: a state JSON always names a complete tensor file


@torch.no_grad()
def _load_state(state_dir: Path, key: dict, params, optimizer) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    meta_path = state_dir / STATE_JSON
    if not meta_path.is_file():
        return 0, []
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key:
        differs = sorted(k for k in key if meta.get("key", {}).get(k) != key[k])
        raise JointRankError(f"the distillation state in {state_dir} was made with different {', '.join(differs)}; "
                             f"delete it to start over, or rerun with the same settings")
    tensors = load_file(str(state_dir / STATE_TENSORS))
    for n, p in params:
        p.copy_(tensors[f"param/{n}"].to(p.device, p.dtype))
        if f"exp_avg/{n}" in tensors:
            optimizer.state[p] = {"step": tensors[f"adam_step/{n}"].reshape(()).clone(),
                                  "exp_avg": tensors[f"exp_avg/{n}"].to(p.device).clone(),
                                  "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(p.device).clone()}
    return int(meta["step"]), list(meta["losses"])


def heal_(student: nn.Module, teacher: "nn.Module | dict", calibration, kind: str,
          settings: DistillSettings | None = None, *, state_dir: str | Path | None = None, save_every: int = 10,
          progress: bool = True, release_teacher: bool = False, quantize: str | None = None, on_step=None) -> dict:
    """Heal `student` in place against `teacher` on `calibration` (methods.calibration.Calibration): kind is one of
    HEAL_KINDS; `teacher` is what healing_reference took from the dense model (a decoder copy, or for distillation
    alone the dense model's states on the calibration windows). Returns what was done, for the manifest: kind,
    seconds, the refit's per-unit errors, the distillation's steps, tokens and loss curve. `release_teacher`: free
    the teacher's decoder copy as soon as it is no longer needed (before distillation trains: one decoder's worth of
    memory less at the peak); the caller must not run the teacher afterwards. `quantize`: the scheme the model
    will be stored with; with settings.quantized_steps, distillation ends with that many steps seen through it
    (the caller then stores it with quantize.quantize_, which keeps the grids those steps trained on). `on_step`:
    distill_'s, for the distillation steps (not the quantised ones)."""
    do_refit, do_distill = parse_heal(kind)
    _require_calibration(kind, calibration)
    if do_refit and isinstance(teacher, dict):
        raise JointRankError("a refit needs the dense decoder layers (teacher_copy), not only their final states")
    started = time.perf_counter()
    report: dict = {"kind": kind, "calibration_source": calibration.source, "calibration_tokens": calibration.tokens}
    if do_refit:
        t = time.perf_counter()
        refit = refit_(student, teacher, calibration.input_ids, progress=progress)
        units = refit["units"]
        report["refit"] = {**refit, "seconds": time.perf_counter() - t, "ridge": REFIT_RIDGE,
                           "mean_rel_error_before": sum(u["rel_error_before"] for u in units) / max(len(units), 1),
                           "mean_rel_error_after": sum(u["rel_error_after"] for u in units) / max(len(units), 1)}
    if do_distill:
        settings = settings or DistillSettings()
        ids = calibration.input_ids
        quantized = settings.quantized_steps if quantize is not None else 0
        states = teacher
        if not isinstance(teacher, dict):  # the windows both phases visit (the same seed: one order, two lengths)
            used = _window_order(int(ids.shape[0]), max(settings.steps, quantized), settings.seed)
            states = teacher_states(teacher, ids, used, progress=progress)
            if release_teacher:
                release_teacher_(teacher)
        done = distill_(student, states, ids, settings, state_dir=state_dir, save_every=save_every, progress=progress,
                        on_step=on_step)
        report["distill"] = asdict(done)
        if quantized:
            from .quantize import fake_quantize_

            fake_quantize_(student, quantize)
            phase = replace(settings, steps=quantized)
            done = distill_(student, states, ids, phase, state_dir=None if state_dir is None
                            else Path(state_dir) / "quantized", save_every=save_every, progress=progress,
                            desc="healing: quantised")
            report["distill_quantized"] = {"scheme": quantize, **asdict(done)}
    report["seconds"] = time.perf_counter() - started
    return report
