"""compress_model: the whole job `jointrank compress` runs, as one library call the CLI is thin over.

In memory: load -> (evaluate the dense model) -> plan -> calibration text (a file, or sampled from the model
itself) -> a dense teacher copy if healing -> compress -> heal -> (evaluate again) -> manifest -> (merge back to
dense) -> atomic save. With `stream=StreamOptions(...)` a local safetensors checkpoint is compressed layer by layer
instead (data-free methods only; no evaluation, healing or dense export, which need the whole model in memory).

    import jointrank
    run = jointrank.compress_model("gemma-3-270m", "gemma-jrk10", config, calibration=jointrank.Calibration("self"),
                                   heal="refit+distill", evaluate=jointrank.Evaluation("wikitext2", max_windows=8))
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import JointRankError


@dataclass(frozen=True)
class Calibration:
    """Calibration text for a data-aware method or for healing: a text file (one document per line), or "self"
    for text sampled from the dense model (no user data; "self:N" sets the number of tokens)."""

    text: str
    tokens: int | None = None  # default: methods.calibration.DEFAULT_TOKENS (or N of "self:N")

    def token_count(self) -> int:
        """Tokens to use: `tokens` if given, else the N of "self:N" (the self default for "self"), else
        methods.calibration.DEFAULT_TOKENS."""
        from .methods.calibration import DEFAULT_TOKENS
        from .methods.selfgen import parse_spec

        return self.tokens or parse_spec(self.text) or DEFAULT_TOKENS


@dataclass(frozen=True)
class Evaluation:
    """Tasks measured before and after compression (jointrank.evaluate), e.g. "wikitext2,piqa"."""

    tasks: str
    data_dir: str | None = None
    limit: int | None = None
    max_windows: int | None = None
    window_bos: bool = False  # every perplexity window started with BOS (jointrank.evaluate.perplexity)

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


@dataclass
class CompressionRun:
    """What compress_model did: the checkpoint written, the compression result and the evaluations."""

    out: Path
    result: object  # compress.CompressionResult
    evals: dict = field(default_factory=dict)  # {"before": ..., "after": ...} when evaluated
    load_seconds: float = 0.0
    seconds: float = 0.0
    layers_resumed: int = 0  # streaming only: layers found finished from an interrupted run


def check_request(config, *, calibration: Calibration | None, heal: str = "none", distill=None,
                  quantize: str | None = None, dense: bool = False) -> None:
    """Refuse, before anything is loaded, a calibration/healing/quantisation request that does not fit."""
    from .methods import parse
    from .methods.selfgen import parse_spec
    from .quantize import check_scheme

    from .plan import CompressionPlan

    check_scheme(quantize)  # an unknown scheme or a missing library, before the model loads
    if quantize is not None and dense:
        raise JointRankError("--dense writes float matrices: drop --quantize, or --dense to store the quantised "
                             "factors")

    planned = isinstance(config, CompressionPlan)  # a ready plan: its allocation has been done already
    method, _ = parse(config.config.get("method", "svd") if planned else config.method)
    healing = heal not in (None, "none")
    loss_allocation = not planned and config.allocation == "loss"
    if loss_allocation and calibration is None:
        raise JointRankError("--allocation loss estimates each truncation's cost on calibration text: give "
                             "--calibration FILE, or --calibration self (no user data)")
    if not method.needs_calibration and not healing and not loss_allocation:
        if calibration is not None:
            raise JointRankError(f"method {method.name!r} is data-free and takes no --calibration (unless --heal "
                                 "is given)")
        return
    if calibration is None:
        why = f"method {method.name!r} needs" if method.needs_calibration else f"--heal {heal} needs"
        raise JointRankError(f"{why} calibration text: give --calibration FILE, or --calibration self for text "
                             "sampled from the model itself (no user data)")
    self_tokens = parse_spec(calibration.text)
    if self_tokens is not None and calibration.tokens is not None and ":" in calibration.text:
        raise JointRankError("give the number of self-generated tokens once: --calibration self:N or "
                             "--calibration-tokens N")
    if self_tokens is None and not Path(calibration.text).is_file():
        raise JointRankError(f"calibration file {calibration.text} does not exist (or use --calibration self)")
    if calibration.token_count() < 1:
        raise JointRankError(f"--calibration-tokens must be positive (got {calibration.token_count()})")
    if healing:
        from .heal import check_heal, check_quantized_steps

        check_heal(heal, distill)
        check_quantized_steps(heal, distill and distill.quantized_steps, quantize)


def calibration_windows(calibration: Calibration | None, model, tokenizer, progress: bool = True):
    """The token windows a Calibration request stands for (sampled from `model` for "self")."""
    if calibration is None:
        return None
    if tokenizer is None:  # a directory of weights without its tokenizer: one clear line, not a traceback
        raise JointRankError("--calibration needs the model's tokenizer (to sample or to read text), and none was "
                             "found with the model: save the tokenizer beside its weights")
    from .methods.calibration import load_text
    from .methods.selfgen import parse_spec, self_calibration

    if parse_spec(calibration.text) is not None:
        return self_calibration(model, tokenizer, calibration.token_count(), progress=progress)
    return load_text(calibration.text, tokenizer, tokens=calibration.token_count())


def heal_state_dir(out: str | Path) -> Path:
    """Where an interrupted distillation keeps what it needs to resume: beside the output, hidden."""
    out = Path(out)
    return out.parent / f".{out.name}.heal"


def compress_model(source: str, out: str | Path, config, *, calibration: Calibration | None = None,
                   heal: str = "none", distill=None, evaluate: Evaluation | None = None, dense: bool = False,
                   device: str | None = None, dtype: str | None = None, overwrite: bool = False, stream=None,
                   quantize: str | None = None, on_plan=None, progress: bool = True) -> CompressionRun:
    """Compress the model `source` names (a directory, a GGUF file, a hub id or an alias) into the checkpoint `out`.

    `config`: a JointRankConfig (planned here) or a ready CompressionPlan (e.g. from `jointrank plan --json`).

    `heal`: none | refit | distill | refit+distill (needs `calibration`; `distill`: heal.DistillSettings);
    `dense`: write the compressed model back as dense matrices; `quantize`: store the factors and the remaining
    linear layers of the decoder quantised ("int8" or "int4", quantize.SCHEMES; after healing, before the "after"
    evaluation); `stream`: a streaming.StreamOptions to compress a local safetensors checkpoint layer by layer; `on_plan(plan)` is called once the plan is known, before any
    weight changes (the CLI prints it there); `progress=False` silences the progress bars (sampling, planning,
    factorising, healing)."""
    from .checkpoint import save
    from .precheck import check_compress

    if stream is not None:  # a streaming run carries its own device and overwrite
        device, overwrite = device or stream.device, overwrite or stream.overwrite
    resolved = check_compress(source, out, overwrite=overwrite, device=device,
                              eval_tasks=evaluate.tasks if evaluate else None,
                              data_dir=evaluate.data_dir if evaluate else None,
                              calibration=calibration.text if calibration else None, streaming=stream is not None)
    if stream is not None:  # refuses what needs the whole model in memory, with that reason
        return _compress_streaming(source, resolved, out, config, stream, calibration=calibration, heal=heal,
                                   evaluate=evaluate, dense=dense, quantize=quantize)
    check_request(config, calibration=calibration, heal=heal, distill=distill, quantize=quantize, dense=dense)
    started = time.perf_counter()
    import torch

    from .compress import compress_, merge_, plan_for
    from .plan import CompressionPlan
    from .sources import load_model

    model, tokenizer, _ = load_model(source, dtype=getattr(torch, dtype or "float32"))
    load_seconds = time.perf_counter() - started
    evals = {}
    if evaluate is not None:
        evals["before"] = _evaluate(model, tokenizer, evaluate)
    windows = calibration_windows(calibration, model, tokenizer, progress=progress)  # loss allocation measures on it
    if isinstance(config, CompressionPlan):  # a ready plan (jointrank plan --json): compress_ checks it fits
        plan, config = config, None
    else:
        plan = plan_for(model, config, calibration=windows, progress=progress)
    if on_plan is not None:
        on_plan(plan)
    healing = heal not in (None, "none")
    teacher = None
    if healing:
        from .heal import healing_reference

        teacher = healing_reference(model, windows, heal, progress=progress)  # before any weight changes
    result = compress_(model, plan, device=device, calibration=windows, progress=progress)
    if healing:
        from .heal import DistillSettings, heal_

        result.extra["heal"] = heal_(model, teacher, windows, heal, distill or DistillSettings(),
                                     state_dir=heal_state_dir(out), progress=progress, release_teacher=True,
                                     quantize=quantize)
        del teacher
    if quantize is not None:
        from .quantize import quantize_

        result.extra["quantization"] = quantize_(model, quantize).to_dict()
    if windows is not None:
        result.extra.setdefault("calibration_source", windows.source)
        result.extra.setdefault("calibration_tokens", windows.tokens)
        if windows.provenance:
            result.extra.setdefault("calibration_provenance", windows.provenance)
    if evaluate is not None:
        evals["after"] = _evaluate(model, tokenizer, evaluate)
    if dense:
        merge_(model)
    out = save(model, tokenizer, out, result, source=source, config=config, evals=evals, overwrite=overwrite)
    if healing:
        shutil.rmtree(heal_state_dir(out), ignore_errors=True)  # the checkpoint is complete: no resume needed
    return CompressionRun(out, result, evals, load_seconds, time.perf_counter() - started)


def _compress_streaming(source: str, resolved, out, config, options, *, calibration, heal, evaluate,
                        dense, quantize=None) -> CompressionRun:
    from .streaming import compress_checkpoint, is_streamable_source

    refused = [flag for flag, on in (("--eval", evaluate is not None), ("--dense", dense),
                                     ("--calibration", calibration is not None),
                                     ("--heal", heal not in (None, "none")),
                                     ("--quantize", quantize is not None)) if on]
    if refused:
        raise JointRankError(f"{' and '.join(refused)} need the whole model in memory: drop --stream, --resume, "
                             "--workers, --backend and --seed")
    if resolved.kind != "hf_dir" or not is_streamable_source(resolved.path):
        raise JointRankError(f"streaming reads a local Hugging Face directory with safetensors weights; {source} "
                             f"is a {resolved.kind.replace('_', ' ')}")
    done = compress_checkpoint(resolved.path, out, config, options=options, source_label=source)
    return CompressionRun(done.out, done.result, {}, 0.0, done.seconds, done.layers_done_before)


def _evaluate(model, tokenizer, evaluation: Evaluation) -> dict:
    try:
        from .evaluate import evaluate
    except ImportError as exc:
        raise JointRankError(f"--eval needs the eval extra: pip install 'jointrank[eval]' ({exc})") from exc
    return evaluate(model, tokenizer, evaluation.task_list(), data_dir=evaluation.data_dir, limit=evaluation.limit,
                    max_windows=evaluation.max_windows, window_bos=evaluation.window_bos)
