"""The `jointrank` command: a thin layer over the Python API. Every user mistake is one line on stderr, exit 1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import JointRankError
from .format import structure_of
from .linalg import SOLVERS
from .plan import ALLOCATION_PRIORS, ALLOCATIONS, PRESETS

DESCRIPTION = """\
Make a language model smaller by low-rank approximation of its weights, without data, and see what it cost.

Weights that read the same input (Q and K; gate and up) can be factorised *jointly*: stacked and decomposed once,
they share one input basis, costing k*(sum d_out + d_in) parameters instead of sum k*(d_out + d_in)
(arXiv 2402.16319). V, O and down are factorised separately or kept.

examples:
  jointrank compress gemma-3-270m --preset paper-10 --scope decoder --out gemma-jrk10
  jointrank compress ./my-llama --qk joint --gate-up joint@last:8 --ratio 0.5 --out small
  jointrank plan gemma-3-270m --preset paper-20 --scope decoder        # what would happen, touching nothing
  jointrank info gemma-jrk10                                          # per layer: method, rank, energy kept
"""

GROUP_FLAGS = {"qk": "--qk", "gate_up": "--gate-up", "v": "--v", "o": "--o", "down": "--down"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except JointRankError as exc:
        print(f"jointrank: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jointrank: interrupted; nothing was written", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jointrank", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(metavar="COMMAND")

    compress = sub.add_parser("compress", help="compress a model and save it",
                              description="Plan, factorise and save. MODEL: a Hugging Face directory, a .gguf "
                              "file, a hub id (org/name) or an alias: gemma-3-270m (the embedded default) or another model "
                              "listed by `jointrank models`.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_plan_arguments(compress)
    compress.add_argument("--plan", default=None, metavar="FILE",
                          help="follow a plan written by `jointrank plan --json FILE` (reviewed, edited or made "
                          "on another machine) instead of planning: no structure, rank or allocation flags then. "
                          "How loss-aware allocation reaches --stream: plan it in memory once, stream it after "
                          "(with a data-free --method)")
    compress.add_argument("--out", required=True, help="output directory (refused if it exists, see --overwrite)")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    compress.add_argument("--dense", action="store_true",
                          help="write the rank-reduced weights back into the original shapes: a plain transformers "
                          "checkpoint of the original size (for denoising experiments and other runtimes)")
    from .quantize import SCHEMES

    compress.add_argument("--quantize", choices=list(SCHEMES), default=None, metavar="SCHEME",
                          help="store the decoder's factors and remaining linear layers quantised, weight-only and "
                          "data-free (after healing): " + "; ".join(f"{k}: {v.about}" for k, v in SCHEMES.items())
                          + ". Needs pip install 'jointrank[quant]'; reloads through transformers like any "
                          "checkpoint. On a CPU it decodes slower than float (results/quantize.md)")
    compress.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda (default: with the weights)")
    compress.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                          help="dtype the model is loaded and saved in (the SVDs always run in float32 or better; "
                          "default float32, or with --stream the checkpoint's own)")
    stream = compress.add_argument_group(
        "streaming", "read a local safetensors checkpoint layer by layer and write it shard by shard, never holding "
        "the model: memory stays at about one layer whatever the model size. Opt-in because an interrupted run keeps "
        "its finished layers (in .OUT.partial, for --resume) and --eval/--dense/calibration need the whole model")
    stream.add_argument("--stream", action="store_true", help="stream (implied by the flags below)")
    stream.add_argument("--resume", action="store_true", help="continue an interrupted streaming run from its last "
                        "finished layer; the output is byte-identical to an uninterrupted run")
    stream.add_argument("--workers", type=int, default=1, metavar="N",
                        help="units factorised at once, the cores split between them (local); layer tasks in "
                        "flight (ray, default: all)")
    stream.add_argument("--backend", choices=["local", "ray"], default="local",
                        help="ray: one task per layer on the cluster named by RAY_ADDRESS (or a local one); the "
                        "checkpoint and --out must be on storage every node sees")
    stream.add_argument("--seed", type=int, default=None, help="seed of the randomized solver (default 0)")
    compress.add_argument("--eval", default=None, metavar="TASKS",
                          help="evaluate before and after, e.g. wikitext2 or wikitext2,piqa (see `jointrank eval`)")
    compress.add_argument("--eval-limit", type=int, default=None, help="examples per zero-shot task for --eval")
    compress.add_argument("--eval-max-windows", type=int, default=None,
                          help="perplexity windows for --eval (default: the whole split)")
    compress.add_argument("--eval-window-bos", action="store_true",
                          help="start every --eval perplexity window with BOS (see `jointrank eval --window-bos`)")
    compress.add_argument("--data-dir", default=None, help="evaluation data directory (or JOINTRANK_DATA)")
    compress.set_defaults(func=cmd_compress)

    plan = sub.add_parser("plan", help="print what compress would do, without changing anything",
                          description="Compute and print the compression plan (from shapes; nothing is changed or "
                          "written) and an estimate of how long `compress` with the same options takes here.")
    _add_plan_arguments(plan)
    plan.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON")
    plan.add_argument("--no-estimate", action="store_true",
                      help="skip the time estimate (it runs one forward pass and factorises the largest unit once)")
    plan.set_defaults(func=cmd_plan)

    info = sub.add_parser("info", help="describe a compressed checkpoint",
                          description="Per layer and group: method, rank, parameters before/after, energy kept.")
    info.add_argument("checkpoint")
    info.add_argument("--layers", action="store_true", help="one row per layer and unit instead of a summary")
    info.add_argument("--verify", action="store_true", help="also check every tensor's bytes against the sha256 "
                      "recorded at save time (the structure is always checked)")
    info.set_defaults(func=cmd_info)

    for module in SUBCOMMAND_MODULES:
        _register_optional(sub, module)
    return parser


# Areas that add their own subcommands through a `register(subparsers)` function. An area whose optional
# dependencies are missing (e.g. lm-eval for `eval`) is left out of --help instead of breaking the command.
SUBCOMMAND_MODULES = ("jointrank.evaluate.cli", "jointrank.zoo_cli")  # the paper's experiments: python -m research.experiments


def _register_optional(sub, module_name: str) -> None:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            return  # the area does not exist in this version
        return  # an optional dependency of that area is not installed
    module.register(sub)


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--preset", choices=sorted(PRESETS),  # from the registry, so a new preset needs no CLI edit
                   help="the paper's structures: paper-10 = separate rank-k on W_Q and W_K of every layer; "
                   "paper-20 = that plus joint rank-k on W_gate/W_up of the last 22/32 of the layers. Ranks are "
                   "solved so 10%% / 20%% of the parameters in --scope are removed")
    p.add_argument("--scope", choices=["model", "decoder"], default=None,
                   help="what --target (and a preset's target) is a fraction of: the whole model (the paper's, "
                   "default) or the decoder layers alone (small models keep most parameters in the embedding)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--ratio", type=float, help="approximation ratio k / min(d_out, d_in) of every factorised "
                      "unit, in (0, 1]")
    rule.add_argument("--rank", type=int, help="one absolute rank k for every factorised unit")
    rule.add_argument("--target", type=float, help="fraction of the --scope's parameters to remove, e.g. 0.2; "
                      "one ratio is solved for")
    for group, flag in GROUP_FLAGS.items():
        joinable = group in ("qk", "gate_up")
        p.add_argument(flag, dest=f"group_{group}", metavar="METHOD[@LAYERS]",
                       help=f"{'keep | separate | joint' if joinable else 'keep | separate'} for {group}, "
                       f"optionally on some layers only, e.g. {'joint' if joinable else 'separate'}@last:8 or "
                       "separate@0-5,20-31")
    p.add_argument("--layers", default="all", help="layers for group flags given without @LAYERS: all, first:N, "
                   "last:N, last:A/B (a fraction), or 0-5,20-31 (default: all)")
    p.add_argument("--solver", choices=SOLVERS, default="auto",
                   help="how factors are computed: exact SVD; Gram matrix + eigh in float64 (faster on tall "
                   "matrices) or in float32, falling back to float64 when float32 could cost over 1e-5 of relative error "
                   "(gram32, 2-3x faster than SVD on LLaMA-7B shapes); seeded randomized SVD (rsvd, for low "
                   "ranks of large matrices); auto picks by shape and rank")
    p.add_argument("--keep-unprofitable", action="store_true",
                   help="factorise even units whose factors are not smaller than their weights (for experiments)")
    p.add_argument("--keep-slow", nargs="?", type=float, const=0.0, default=None, metavar="MARGIN",
                   help="keep dense every unit that would be slower or larger than dense at its rank (per-token "
                   "multiply-adds and weight bytes, see the plan's cost column); with MARGIN, also those saving "
                   "less than that fraction, e.g. 0.1, since two thin matmuls run below peak speed")
    p.add_argument("--method", default="svd", metavar="NAME[:OPTION]",
                   help="decomposition: svd (plain, the paper's; default), balanced[:norm|heads|alone] (joint "
                   "members weighted before stacking); with --calibration: asvd, svd_llm, llm_rom")
    p.add_argument("--method-param", action="append", default=[], metavar="NAME=VALUE",
                   help="a hyperparameter of --method, repeatable; the manifest records every one, defaults "
                   f"included. Defaults: {_method_param_defaults()}")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                   help="uniform: one ratio for every unit; global: every unit's rank (or dense) chosen together "
                   "from the weights' spectra to meet --target (data-free; works with --stream too); loss: every "
                   "group's structure (dense, separate, joint) and ranks from the loss each truncation is estimated "
                   "to cost on --calibration text (whitened truncation error weighted by the output Fisher)")
    p.add_argument("--allocation-prior", choices=ALLOCATION_PRIORS, default="flat",
                   help="with --allocation global, how much a unit's lost energy counts: flat (the same everywhere), "
                   "depth (early layers count up to twice), residual (Gemma-2/3: each block's write scale relative to "
                   "the residual stream it writes into; best measured at 20-30%%, results/methods.md)")
    p.add_argument("--share-layers", type=int, default=1, metavar="N",
                   help="cross-layer shared bases: every compressed unit of N adjacent layers (e.g. o_proj of layers "
                   "4 and 5, or joint gate/up of both) factorised once, one input basis stored for all N (Basis "
                   "Sharing); affords a higher rank at the same parameters. Default 1 (per layer). Not with "
                   "--allocation loss or the sequential method llm_rom. Measured on Gemma-3-270M (results/quality.md): "
                   "sharing every group lost at 20%% and 30%%; sharing down_proj alone won at 30%%")
    p.add_argument("--share-groups", default=None, metavar="GROUPS",
                   help="with --share-layers: only these groups share a basis across layers, e.g. down or o,down "
                   "(default: every compressed group). Sharing saves the basis, d_in x k, so it pays most where "
                   "d_in is large against the outputs (down_proj)")
    p.add_argument("--calibration", default=None, metavar="FILE|self[:TOKENS]",
                   help="calibration text for the data-aware methods and for --heal: a text file (documents one per "
                   "line), or 'self' for text sampled from the dense model itself, no user data (seeded; each document "
                   "sampled alone, a loop ended where it starts; cached in $JOINTRANK_CACHE or ~/.cache/jointrank; "
                   "'self:8192' sets the number of tokens)")
    p.add_argument("--calibration-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens to use, in windows of 512 (default: 16384)")
    from .heal import QUANTIZED_STEPS, DistillSettings

    heal = p.add_argument_group(
        "healing", "after factorisation, recover quality from the dense model itself (needs --calibration, which "
        "can be 'self'); the parameter count does not change")
    heal.add_argument("--heal", default="none", choices=["none", "refit", "distill", "refit+distill"],
                      help="refit: closed-form least-squares refit of every unit's output factors and biases, layer "
                      "by layer, to the dense layer's outputs (seconds; on Gemma-3-270M it measured worse than no "
                      "healing on text started with BOS, results/quality.md); distill: train all factors against the "
                      "dense model (KL on next-token distributions; minutes); refit+distill: both, in that order")
    heal.add_argument("--heal-steps", type=int, default=100, metavar="N",
                      help="distillation steps, one calibration window (512 tokens) each, cycling over the windows "
                      "(default 100)")
    heal.add_argument("--heal-minutes", type=float, default=None, metavar="M",
                      help="stop distilling after M minutes (the steps done are recorded in the manifest)")
    heal.add_argument("--heal-lr", type=float, default=DistillSettings.lr, metavar="LR",
                      help=f"distillation learning rate (Adam; default {DistillSettings.lr:g}, which on Gemma-3-270M "
                      "healed perplexity on text started with BOS and kept zero-shot accuracy better than 1e-4: "
                      "results/heal_zeroshot.md, results/quality.md)")
    heal.add_argument("--heal-head-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="precision of the frozen LM head's matmuls while distilling (softmax and KL stay float32): "
                      "bfloat16 (default) healed Gemma-3-270M 1.47x faster than float32 on a 2-core CPU with bf16 "
                      "instructions, to within 1%% of its perplexity (results/distill_precision.md, "
                      "results/quality.md), for 0.27 GiB more memory; float32 repeats older runs bit for bit")
    heal.add_argument("--heal-quantized-steps", type=int, default=None, metavar="N",
                      help="with --quantize: after the float steps, N more distillation steps that see every weight "
                      "as --quantize will store it (rounded on the grid it is saved on; the gradient passed straight "
                      "through), so the factors learn to work after rounding; 0 turns it off (default: "
                      f"{QUANTIZED_STEPS} with --quantize)")


def _method_param_defaults() -> str:
    """'asvd alpha=0.5; svd_llm damping=0.01; ...' from the method registry (a new method documents itself)."""
    import dataclasses

    from . import methods

    parts = []
    for name in methods.available():
        fields = dataclasses.fields(methods.settings_for(name))
        if fields:
            parts.append(f"{name} " + ", ".join(f"{f.name}={f.default}" for f in fields))
    return "; ".join(parts).replace("%", "%%")


def _method_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise JointRankError(f"--method-param takes NAME=VALUE (e.g. damping=0.05); got {pair!r}")
        params[name.strip()] = value.strip()
    return params


def config_from_args(args):
    from .plan import PRESETS, GroupRule, JointRankConfig, validate

    if args.preset:
        base = PRESETS[args.preset]
        rules = dict(base.rules)
        target = base.target
    else:
        rules, target = {}, None
    for group in GROUP_FLAGS:
        value = getattr(args, f"group_{group}")
        if value:
            method, _, layers = value.partition("@")
            rules[group] = GroupRule(method.strip(), layers.strip() or args.layers)
    if args.ratio is not None or args.rank is not None or args.target is not None:
        target = args.target
    config = JointRankConfig(rules=rules, ratio=args.ratio, rank=args.rank, target=target,
                             scope=args.scope or "model", solver=args.solver,
                             only_if_smaller=not args.keep_unprofitable, preset=args.preset,
                             method=args.method, allocation=args.allocation, keep_slow=args.keep_slow,
                             allocation_prior=args.allocation_prior, share_layers=args.share_layers,
                             share_groups=[g.strip() for g in args.share_groups.split(",")] if args.share_groups
                             else None,
                             method_params=_method_params(args.method_param))
    validate(config)
    return config


# flags that make a plan: with --plan FILE they would be ignored, so they are refused instead
PLAN_FLAGS = ("preset", "scope", "ratio", "rank", "target", "layers", "solver", "keep_unprofitable", "keep_slow",
              "method", "method_param", "allocation", "allocation_prior", "share_layers", "share_groups",
              *(f"group_{g}" for g in GROUP_FLAGS))


def _plan_from_file(args):
    """The CompressionPlan in --plan FILE: a plan JSON as `jointrank plan --json` writes it, checked for shape."""
    import json

    from .plan import CompressionPlan, JointRankConfig, validate

    parser_defaults = build_parser().parse_args(["compress", "MODEL", "--out", "OUT"])
    given = [f"--{name.replace('group_', '').replace('_', '-')}" for name in PLAN_FLAGS
             if getattr(args, name) != getattr(parser_defaults, name)]
    if given:
        raise JointRankError(f"--plan FILE is the whole plan: drop {', '.join(given)}")
    try:
        data = json.loads(Path(args.plan).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JointRankError(f"--plan: {args.plan} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JointRankError(f"--plan: {args.plan} is not a plan JSON ({exc})") from None
    try:
        plan = CompressionPlan.from_dict(data)
        validate(JointRankConfig.from_dict(plan.config))
    except JointRankError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise JointRankError(f"--plan: {args.plan} is not a plan as `jointrank plan --json` writes it "
                             f"({type(exc).__name__}: {exc})") from None
    return plan


def cmd_plan(args) -> int:
    import json

    from .compress import plan_for
    from .precheck import check_json_out
    from .sources import load_model

    config = config_from_args(args)
    heal_settings = _heal_settings(args)
    _check_calibration(args, config, heal_settings)
    if args.json:
        check_json_out(args.json, "--json")  # before the model is loaded
    model, tokenizer, _ = load_model(args.model)
    windows = None
    if config.allocation == "loss":  # the plan is measured on the calibration text
        from .methods.selfgen import parse_spec
        from .pipeline import calibration_windows

        request = _calibration_request(args)
        # say why a plan takes minutes here (sampling, then a backward pass), before the progress bars start
        what = "sampling" if parse_spec(request.text) is not None else "reading"
        print(f"--allocation loss plans from the loss measured on calibration text: {what} "
              f"{request.token_count()} tokens first (self-generated text is cached: compress reuses it)",
              file=sys.stderr)
        windows = calibration_windows(request, model, tokenizer)
    plan = plan_for(model, config, calibration=windows)
    _print_plan(plan)
    if not args.no_estimate:
        from .estimate import estimate

        calibration = _calibration_request(args)
        tokens = calibration.token_count() if calibration else 0  # no calibration text: no windows to time
        print()
        print(estimate(model, tokenizer, plan, method=config.method, solver=config.solver,
                       calibration=args.calibration, calibration_tokens=tokens, heal=args.heal,
                       heal_steps=heal_settings.steps if heal_settings else 0, config=config).render())
    from .heal import parse_heal

    if parse_heal(args.heal)[1]:  # healing distils: its optimiser memory
        from .estimate import distillation_memory

        trainable, extra = distillation_memory(plan, next(model.parameters()).element_size())
        print(f"healing trains {trainable:,} factor parameters: their gradients and Adam's moments add "
              f"{extra / 2**30:.2f} GiB to the compressed model's memory (activations of one window on top)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=2)
    return 0


def _print_plan(plan) -> None:
    from .tables import params_summary, plan_summary

    entries = [vars(e) for e in plan.entries if e.structure != "keep" or e.note]
    print(plan_summary(entries) if entries else "(nothing to factorise)")
    if plan.ratio is not None:
        print(f"\napproximation ratio: {plan.ratio:.4f}")
    print()
    print(params_summary(plan.params_total_before, plan.params_total_after, plan.params_decoder_before,
                         plan.params_decoder_after))


def cmd_compress(args) -> int:
    from .pipeline import compress_model
    from .stream import wants_stream

    from .precheck import check_workers

    config = _plan_from_file(args) if args.plan else config_from_args(args)  # bad flags fail here, before loading
    check_workers(args.workers)  # the rest is checked by compress_model, still before anything is loaded
    if wants_stream(args):
        return _compress_streaming(args, config)

    def show_plan(plan) -> None:
        _print_plan(plan)
        print()

    run = compress_model(args.model, args.out, config, calibration=_calibration_request(args), heal=args.heal,
                         distill=_heal_settings(args), evaluate=_evaluation_request(args), dense=args.dense,
                         device=args.device, dtype=args.dtype, overwrite=args.overwrite, quantize=args.quantize,
                         on_plan=show_plan)
    # the scope table was already printed with the plan (show_plan): printing it again here duplicated it
    result = run.result
    healed = f", heal {result.extra['heal']['seconds']:.1f} s" if "heal" in result.extra else ""
    if "quantization" in result.extra:
        q = result.extra["quantization"]
        healed += f", quantise {q['modules']} modules to {q['scheme']} {q['seconds']:.1f} s"
    print(f"\nload {run.load_seconds:.1f} s, factorise {result.seconds:.1f} s{healed}, "
          f"total {run.seconds:.1f} s; saved {'dense ' if args.dense else ''}checkpoint to {args.out}")
    if run.evals:
        _print_evals(run.evals)
    return 0


def _compress_streaming(args, config) -> int:
    """`compress --stream` (or --resume/--workers/--backend/--seed): the same library call with StreamOptions;
    what streaming cannot do (eval, heal, calibration, dense) is refused there, naming the flags."""
    from .pipeline import compress_model
    from .stream import StreamOptions
    from .tables import params_summary

    # solver unset: streaming takes the plan's (the config's --solver, or a --plan file's), as compress_ does
    options = StreamOptions(solver=None, seed=0 if args.seed is None else args.seed, device=args.device,
                            dtype=args.dtype, workers=args.workers or 1, backend=args.backend, resume=args.resume,
                            overwrite=args.overwrite)
    try:
        run = compress_model(args.model, args.out, config, stream=options, calibration=_calibration_request(args),
                             heal=args.heal, evaluate=_evaluation_request(args), dense=args.dense,
                             quantize=args.quantize)
    except KeyboardInterrupt:
        out = Path(args.out)
        print(f"jointrank: finished layers are kept in {out.parent / ('.' + out.name)}.partial; rerun with "
              "--resume to continue", file=sys.stderr)
        raise
    r = run.result
    print(params_summary(r.params_total_before, r.params_total_after, r.params_decoder_before,
                         r.params_decoder_after))
    resumed = f" ({run.layers_resumed} layers resumed)" if run.layers_resumed else ""
    print(f"\nstreamed {r.plan.num_layers} layers{resumed}: factorise {r.extra['stream']['factorise_seconds']:.1f} s, "
          f"total {run.seconds:.1f} s; saved checkpoint to {args.out}")
    return 0


def _calibration_request(args):
    from .pipeline import Calibration

    return Calibration(args.calibration, args.calibration_tokens) if getattr(args, "calibration", None) else None


def _evaluation_request(args):
    from .pipeline import Evaluation

    if not getattr(args, "eval", None):
        given = [flag for flag, value in (("--eval-limit", args.eval_limit), ("--eval-max-windows",
                 args.eval_max_windows), ("--eval-window-bos", args.eval_window_bos)) if value]
        if given:  # a setting of an evaluation nobody asked for is a mistake, not something to ignore
            raise JointRankError(f"{', '.join(given)} only apply with --eval TASKS")
        return None
    return Evaluation(args.eval, data_dir=args.data_dir, limit=args.eval_limit, max_windows=args.eval_max_windows,
                      window_bos=args.eval_window_bos)


def _check_calibration(args, config, heal_settings) -> None:
    """The calibration/healing flags against the method, then the healing settings, before anything is loaded."""
    from .pipeline import check_request

    check_request(config, calibration=_calibration_request(args), heal=getattr(args, "heal", "none"),
                  distill=heal_settings, quantize=getattr(args, "quantize", None))


def _heal_settings(args):
    """DistillSettings for --heal (refit alone needs none but is checked the same way); None without healing.
    Checked by pipeline.check_request, after the calibration flags, so the first mistake is the one reported."""
    from .heal import QUANTIZED_STEPS, DistillSettings, check_quantized_steps

    if getattr(args, "heal", "none") in (None, "none"):
        check_quantized_steps("none", getattr(args, "heal_quantized_steps", None), getattr(args, "quantize", None))
        return None

    quantized = args.heal_quantized_steps  # given: checked by check_request; default: on when quantising
    if quantized is None:
        quantized = QUANTIZED_STEPS if getattr(args, "quantize", None) and "distill" in args.heal else 0
    return DistillSettings(steps=args.heal_steps, lr=args.heal_lr, max_minutes=args.heal_minutes,
                           head_dtype=args.heal_head_dtype, quantized_steps=quantized)


def _print_evals(evals: dict) -> None:
    try:
        from .evaluate.report import comparison_table
    except ImportError:
        comparison_table = None
    if comparison_table is not None:
        print()
        print(comparison_table(evals["before"], evals["after"]))


def _bytes_table(checkpoint, quantization: dict | None) -> str:
    """Bytes on disk per tensor kind, from the safetensors headers (what is stored, not computed from bit widths)."""
    from .format import TENSOR_KINDS, tensor_kind
    from .tables import format_table
    from .verify import stored_tensors

    kinds: dict[str, list] = {k: [0, 0, set()] for k in TENSOR_KINDS}
    for name, t in stored_tensors(checkpoint).items():
        row = kinds[tensor_kind(name, t.shape)]
        row[0] += 1
        row[1] += t.end - t.start
        row[2].add(t.dtype)
    total = sum(r[1] for r in kinds.values())
    rows = [[k, n, f"{b / 2**20:.2f}", f"{b / max(total, 1):.1%}", ", ".join(sorted(d))]
            for k, (n, b, d) in kinds.items() if n]
    rows.append(["total", sum(r[0] for r in kinds.values()), f"{total / 2**20:.2f}", "100.0%", ""])
    head = "bytes on disk"
    if quantization:
        head += (f" (decoder linear layers and factors quantised to {quantization['scheme']} with "
                 f"{quantization['library']} {quantization.get('library_version') or ''}".rstrip() + ")")
    return head + ":\n" + format_table(["tensor kind", "tensors", "MiB", "share", "dtypes"], rows)


def _healing_line(extra: dict) -> str:
    """What calibration text and healing a checkpoint was made with, from its manifest."""
    source = extra.get("calibration_source")
    kind = (extra.get("calibration_provenance") or {}).get("kind")
    text = f"calibration: {source} ({kind or 'file'}, {extra.get('calibration_tokens')} tokens)" if source else \
        "calibration: none (data-free)"
    heal = extra.get("heal")
    if not heal:
        return f"{text}; healing: none"
    parts = [heal["kind"]]
    if "refit" in heal:
        r = heal["refit"]
        parts.append(f"refit output error {r['mean_rel_error_before']:.3f} -> {r['mean_rel_error_after']:.3f}")
    if "distill" in heal:
        d = heal["distill"]
        parts.append(f"distillation {d['steps_done']} steps, KL {d['loss_first']:.4f} -> {d['loss_last']:.4f}"
                     + (" (stopped by --heal-minutes)" if d["stopped"] == "time" else ""))
    return f"{text}; healing: " + ", ".join(parts)


def cmd_info(args) -> int:
    from .tables import format_table, layer_ranges, params_summary, plan_summary, unit_labels
    from .verify import MANIFEST_KEYS, read_manifest, verify_checkpoint

    manifest = read_manifest(args.checkpoint, required=MANIFEST_KEYS)
    report = verify_checkpoint(args.checkpoint, checksums=args.verify)  # a damaged checkpoint is refused here
    plan, result = manifest["plan"], manifest["result"]
    stats = {tuple(u["members"]): u for u in result["units"]}
    print(f"{args.checkpoint}: {manifest.get('format_kind', 'factorised')} checkpoint of {manifest['source']} "
          f"({plan['model_type']}, {plan['num_layers']} layers), jointrank {manifest['versions']['jointrank']}")
    if "source_record" in manifest:  # a named real model: where its weights come from and under what licence
        origin = manifest["source_record"]
        print(f"weights: {origin['origin']} ({origin['licence']}), from {', '.join(origin['packages'][:2])}"
              f"{' ...' if len(origin['packages']) > 2 else ''}, GGUF sha256 {origin['gguf_sha256'][:12]}...")
    cfg = manifest["config"]
    rule = (f"ratio {cfg['ratio']}" if cfg.get("ratio") is not None else f"rank {cfg['rank']}"
            if cfg.get("rank") is not None else f"target {cfg['target']:.0%} of {cfg['scope']}")
    print(f"preset: {cfg.get('preset') or '-'}; rule: {rule}; solved ratio: {plan.get('ratio')}")
    print(_healing_line(result.get("extra", {})) + "\n")
    if args.layers:
        rows = []
        for e in plan["entries"]:
            if structure_of(e) == "keep":
                continue
            s = stats.get(tuple(e["members"]), {})
            layers, who, structure = unit_labels(e)
            rows.append([e["layer"] if len(layers) == 1 else layer_ranges(layers), e["group"], who, structure,
                         e["rank"], e["params_before"], e["params_after"], s.get("energy_kept"),
                         "/".join(f"{x:.3f}" for x in s.get("member_rel_errors", []))])
        print(format_table(["layer", "group", "members", "structure", "rank", "params before", "params after",
                            "energy kept", "rel. error per member"], rows))
    else:
        print(plan_summary([e for e in plan["entries"] if structure_of(e) != "keep" or e.get("note")]))
        energies = [u["energy_kept"] for u in result["units"]]
        if energies:
            print(f"\nenergy kept per unit: min {min(energies):.4f}, mean {sum(energies) / len(energies):.4f}, "
                  f"max {max(energies):.4f}  (use --layers for each unit)")
    p = result["params"]
    print()
    print(params_summary(p["total_before"], p["total_after"], p["decoder_before"], p["decoder_after"]))
    print()
    print(_bytes_table(args.checkpoint, result.get("extra", {}).get("quantization")))
    print(f"\nverified: {report.tensors} tensors are exactly what config.json and the manifest imply; checksums: "
          f"{report.checksums}")
    for phase in ("before", "after"):
        if manifest.get("evaluation", {}).get(phase):
            _print_evals(manifest["evaluation"])
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
