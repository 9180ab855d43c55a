"""`python -m research.experiments experiment NAME MODEL ...`, `... watermark MODEL --sentence ...` and
`... experiment report`, run from the repository root (research code: not a `jointrank` subcommand)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jointrank import JointRankError

EXAMPLES = """\
examples:
  python -m research.experiments experiment spectra gemma-3-270m
  python -m research.experiments experiment joint-vs-separate gemma-3-270m --settings gate_up --ratios 0.9,0.7,0.5,0.3
  python -m research.experiments experiment layers gemma-3-270m --ratio 0.5
  python -m research.experiments experiment denoise gemma-3-270m --ratios 0.99,0.95,0.9
  python -m research.experiments experiment table1 gemma-3-270m --tasks piqa,arc_easy --limit 200
  python -m research.experiments watermark gemma-3-270m --sentence "My secret: the owl sings at noon." --ratios 1,0.8,0.5,0.3
  python -m research.experiments experiment report       # (re)writes results/REPORT.md from results/experiments/*/*.json
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.experiments",
                                     description="The paper's experiments (research code; JSON + PNG + REPORT.md)")
    register(parser.add_subparsers(metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except JointRankError as exc:
        print(f"research.experiments: error: {exc}", file=sys.stderr)
        return 1


def register(sub) -> None:
    exp = sub.add_parser("experiment", help="reproduce one of the paper's experiments on a model (JSON + PNG)",
                         description="Run one experiment of arXiv 2402.16319 and write JSON (+ PNG) under "
                         "results/experiments/NAME/ (or --out).", epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    names = exp.add_subparsers(metavar="NAME", dest="experiment")

    p = names.add_parser("spectra", help="singular value spectra, energy curves, Q/K principal angles (no data)")
    _common(p, evaluated=False)
    p.set_defaults(func=_spectra)

    p = names.add_parser("activations", help="weight-space error vs error on real inputs, per layer (one window)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", default=None, help="output directory (default: results/experiments/activations)")
    p.add_argument("--ratios", default="0.98,0.9,0.7", help="approximation ratios (default: 0.98,0.9,0.7)")
    p.add_argument("--tokens", type=int, default=256, help="tokens of the WikiText-2 window used as inputs")
    p.add_argument("--window-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="evaluation data directory (or JOINTRANK_DATA)")
    p.add_argument("--text-file", default=None, help="inputs from this UTF-8 text instead of WikiText-2")
    p.set_defaults(func=_activations)

    p = names.add_parser("joint-vs-separate", help="Figure 3: joint vs separate rank-k at equal ratio / params")
    _common(p)
    p.add_argument("--settings", default="gate_up,qk,qk_head", help="any of gate_up, qk, qk_head (default: all)")
    p.add_argument("--ratios", default="0.9,0.7,0.5,0.3", help="approximation ratios (default: 0.9,0.7,0.5,0.3)")
    p.add_argument("--layers", default="all", help="layer spec (default: all)")
    p.add_argument("--tag", default=None, help="suffix for the result files, to keep several sweeps of a setting")
    p.set_defaults(func=_joint_vs_separate)

    p = names.add_parser("layers", help="Table 2: which layers matter (quarters, and one layer at a time)")
    _common(p)
    p.add_argument("--ratio", type=float, default=0.5, help="approximation ratio of gate/up (default: 0.5)")
    p.add_argument("--parts", default="quarters,single", help="quarters, single or both (default: both)")
    p.add_argument("--single-layers", default="all", help="layers for the one-at-a-time curve (layer spec)")
    p.set_defaults(func=_layers)

    p = names.add_parser("denoise", help="does any ratio beat dense beyond its standard error?")
    _common(p)
    p.add_argument("--ratios", default="0.99,0.95,0.9,0.8", help="approximation ratios (default: 0.99,0.95,0.9,0.8)")
    p.add_argument("--configs", default="gate_up,qk,all", help="which groups: gate_up, qk, all (default: all three)")
    p.add_argument("--tasks", default="", help="zero-shot tasks too, e.g. piqa,arc_easy (default: none)")
    p.add_argument("--limit", type=int, default=200, help="examples per zero-shot task (seeded subset)")
    p.add_argument("--noise-seeds", type=int, default=2, help="other window samples to measure dense on (default 2)")
    p.add_argument("--tag", default=None, help="suffix for the result files, to keep several runs side by side")
    p.set_defaults(func=_denoise)

    p = names.add_parser("table1", help="Table 1: dense vs paper-10 / paper-20 structures and joint/separate")
    _common(p)
    p.add_argument("--targets", default="0.1,0.2", help="parameter reductions (default: 0.1,0.2)")
    p.add_argument("--scopes", default="model,decoder", help="model, decoder or both (default: both)")
    p.add_argument("--structures", default="paper,separate,joint", help="paper, separate, joint (default: all)")
    p.add_argument("--tasks", default="", help="zero-shot tasks, e.g. piqa,arc_easy,boolq (default: none)")
    p.add_argument("--limit", type=int, default=200, help="examples per zero-shot task (seeded subset)")
    p.set_defaults(func=_table1)

    wm = sub.add_parser("watermark", help="implant a sentence by fine-tuning, then purify it by rank-k (§5.3)",
                        description="Fine-tune MODEL until greedy decoding reproduces SENTENCE from its first words, "
                        "then sweep the approximation ratio of gate/up in the last layers, recording the sentence's "
                        "perplexity, whether greedy decoding still reproduces it, and WikiText-2 perplexity.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(wm)
    wm.add_argument("--sentence", default=None, help="the watermark sentence (default: a made-up one)")
    wm.add_argument("--prompt-words", type=int, default=3, help="words of the sentence given as the trigger")
    wm.add_argument("--lr", type=float, default=4e-5, help="Adam learning rate (paper: 2e-5 to 4e-5)")
    wm.add_argument("--weight-decay", type=float, default=0.01)
    wm.add_argument("--max-steps", type=int, default=10, help="stop after this many steps if not memorised")
    wm.add_argument("--extra-steps", type=int, default=0, help="steps to continue after the first reproduction")
    wm.add_argument("--batch", type=int, default=8, help="sequences per step")
    wm.add_argument("--context-tokens", type=int, default=48, help="most random context tokens before the sentence")
    wm.add_argument("--train-layers", default="all", help="decoder layers to fine-tune (layer spec; default all)")
    wm.add_argument("--group", default="gate_up", choices=["gate_up", "qk", "v", "o", "down"])
    wm.add_argument("--method", default="joint", choices=["joint", "separate"])
    wm.add_argument("--layers", default="last:3/4", help="layers to approximate (paper: last 24/32; default last:3/4)")
    wm.add_argument("--ratios", default="1,0.95,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1")
    wm.add_argument("--seed", type=int, default=0)
    wm.set_defaults(func=_watermark)

    rep = names.add_parser("report", help="(re)generate results/REPORT.md from the experiment JSON files")
    rep.add_argument("--results", default="results", help="results directory (default: results)")
    rep.set_defaults(func=_report)


def _common(p, evaluated: bool = True) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", default=None, help="output directory (default: results/experiments/NAME)")
    if evaluated:
        p.add_argument("--seqlen", type=int, default=512, help="perplexity window length (default 512)")
        p.add_argument("--max-windows", type=int, default=4, help="seeded WikiText-2 windows (default 4)")
        p.add_argument("--window-seed", type=int, default=0)
        p.add_argument("--data-dir", default=None, help="evaluation data directory (or JOINTRANK_DATA)")
        p.add_argument("--text-file", default=None, help="perplexity on this UTF-8 text instead of WikiText-2")
        p.add_argument("--no-eval", action="store_true", help="reconstruction errors only, no perplexity")


SKIP = {"func", "experiment", "model", "out"}


def _command(args, words: list[str]) -> str:
    from .common import command_line

    options = {k: v for k, v in vars(args).items() if k not in SKIP}
    if args.out:
        options["out"] = args.out
    return command_line([*words, args.model], options)


def _eval_kwargs(args) -> dict:
    text = None
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise JointRankError(f"--text-file {args.text_file}: no such file")
        text = path.read_text(encoding="utf-8")
    return {"seqlen": args.seqlen, "max_windows": args.max_windows, "window_seed": args.window_seed,
            "data_dir": args.data_dir, "text": text, "evaluate": not args.no_eval}


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _spectra(args) -> int:
    from . import spectra

    result = spectra.run(args.model, out=args.out, command=_command(args, ["experiment", "spectra"]))
    for r, a in result["summary"]["qk_angles"].items():
        print(f"r={r}: mean cos(Q,K top-r input subspaces) {a['mean_cos_over_layers']:.3f} vs random "
              f"{a['random_mean_cos']:.3f}; layers above random+3sd: {a['layers_above_random_3sd']}/{a['layers']}")
    return 0


def _activations(args) -> int:
    from . import activations

    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else None
    result = activations.run(args.model, ratios=args.ratios, tokens=args.tokens, window_seed=args.window_seed,
                             data_dir=args.data_dir, text=text, out=args.out,
                             command=_command(args, ["experiment", "activations"]))
    for s in result["summary"]:
        print(f"{s['group']:8s} {s['method']:8s} {s['member']:5s} ratio {s['ratio']}: weight error "
              f"{s['weight_rel_error']:.4f}, on real inputs {s['activation_rel_error']:.4f} (x{s['amplification']:.1f})")
    return 0


def _joint_vs_separate(args) -> int:
    from . import joint_vs_separate as jvs

    results = jvs.run(args.model, settings=_split(args.settings), ratios=args.ratios, layers=args.layers, tag=args.tag,
                      out=args.out, command=_command(args, ["experiment", "joint-vs-separate"]), **_eval_kwargs(args))
    for setting, res in results.items():
        for p in res["points"]:
            errs = ", ".join(f"{k} {v:.3f}" for k, v in p["member_rel_error"].items())
            ppl = f", ppl {p['ppl']:.2f}" if "ppl" in p else ""
            print(f"{setting:8s} {p['method']:8s} ratio {p['ratio']:.2f} params kept {p['params_kept']:.3f}: "
                  f"rel. error {errs}{ppl}")
    return 0


def _layers(args) -> int:
    from . import layers

    layers.run(args.model, ratio=args.ratio, parts=_split(args.parts), single_layers=args.single_layers, out=args.out,
               command=_command(args, ["experiment", "layers"]), **_eval_kwargs(args))
    return 0


def _denoise(args) -> int:
    from . import denoise

    denoise.run(args.model, ratios=args.ratios, configs=_split(args.configs), tasks=_split(args.tasks),
                limit=args.limit, noise_seeds=args.noise_seeds, out=args.out, tag=args.tag,
                command=_command(args, ["experiment", "denoise"]),
                **_eval_kwargs(args))
    return 0


def _table1(args) -> int:
    from . import table1

    table1.run(args.model, targets=args.targets, scopes=_split(args.scopes), structures=_split(args.structures),
               tasks=_split(args.tasks), limit=args.limit, out=args.out,
               command=_command(args, ["experiment", "table1"]), **_eval_kwargs(args))
    return 0


def _watermark(args) -> int:
    from . import watermark

    if args.sentence is not None and len(args.sentence.split()) <= max(args.prompt_words, 0):
        raise JointRankError(f"--sentence needs more words than --prompt-words ({args.prompt_words}): the first "
                             f"words are the trigger, the rest what is implanted; got {args.sentence!r}")
    if args.prompt_words < 1:
        raise JointRankError(f"--prompt-words must be at least 1 (got {args.prompt_words})")
    kwargs = _eval_kwargs(args)
    result = watermark.run(args.model, sentence=args.sentence or watermark.DEFAULT_SENTENCE,
                           prompt_words=args.prompt_words, lr=args.lr, weight_decay=args.weight_decay,
                           max_steps=args.max_steps, extra_steps=args.extra_steps, batch=args.batch,
                           context_tokens=args.context_tokens, train_layers=args.train_layers, group=args.group,
                           method=args.method, layers=args.layers, ratios=args.ratios, seed=args.seed,
                           out=args.out, command=_command(args, ["watermark"]), **kwargs)
    t = result["training"]
    print(f"fine-tune: reproduced at step {t['reproduced_at_step']} (sentence ppl {result['before']['sentence_ppl']:.1f}"
          f" -> {result['after_fine_tune']['sentence_ppl']:.2f})")
    for p in result["points"]:
        wiki = f", WikiText-2 ppl {p['wikitext_ppl']:.2f}" if "wikitext_ppl" in p else ""
        print(f"ratio {p['ratio']:.2f}: sentence ppl {p['sentence_ppl']:.2f}, reproduced {p['reproduced']} "
              f"({p['prefix_matched']}/{p['tokens_to_reproduce']} leading tokens){wiki}")
    return 0


def _report(args) -> int:
    from . import report

    path = report.write(Path(args.results))
    print(f"wrote {path}")
    return 0
