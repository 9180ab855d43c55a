"""`jointrank eval` and `jointrank compare`: a thin layer over evaluate() and report.

Wire in with ``register(subparsers)``; each subcommand sets ``func`` (called with the parsed args, returns an exit
code). JointRankError is left to the main CLI, which prints it and exits 1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..errors import JointRankError
from . import GROUPS, KNOWN
from .data import ENV_VAR

DTYPES = ("float32", "bfloat16", "float16")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity and zero-shot accuracy of a model (dense or compressed)",
        description="Evaluate MODEL. Tasks: " + ", ".join(KNOWN) + "; groups: "
        + ", ".join(f"{k} ({','.join(v)})" for k, v in GROUPS.items()),
    )
    p.add_argument("model", help="local HF dir, .gguf, hub id, jointrank checkpoint dir, or the alias gemma-3-270m")
    p.add_argument("--tasks", default="wikitext2", help="comma-separated tasks or groups (default: wikitext2)")
    p.add_argument("--limit", type=_positive, help="score a fixed seeded sample of N documents per zero-shot task")
    p.add_argument("--seed", type=int, default=1234, help="seed of the --limit sample (default 1234)")
    p.add_argument("--seqlen", type=_positive, default=2048, help="perplexity window length in tokens (default 2048)")
    p.add_argument("--max-windows", type=_positive, help="score only the first N perplexity windows")
    p.add_argument("--window-bos", action="store_true",
                   help="start every perplexity window with BOS, as text is seen in use (default: the papers' "
                        "protocol, which starts all but the first window mid-text without it; on Gemma that "
                        "flatters healed models, results/heal_zeroshot.md)")
    p.add_argument("--batch-size", type=_positive, default=8, help="zero-shot batch size (default 8)")
    p.add_argument("--ppl-batch-size", type=_positive, default=1, help="windows per perplexity forward (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to run the model in (default float32; on CPUs without bf16 kernels bfloat16 is slower)")
    p.add_argument("--data-dir", help=f"evaluation data dir (default: ${ENV_VAR}; else the hub when online)")
    p.add_argument("--threads", type=_positive,
                   help="torch CPU threads (default: torch's choice); 1 is much faster when other jobs share the cores")
    p.add_argument("--out", help="write the results JSON here, and its Markdown beside it (.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)

    c = subparsers.add_parser("compare", help="base vs compressed results: delta and retention per task and on average")
    c.add_argument("base", help="results JSON of the base model")
    c.add_argument("compressed", help="results JSON of the compressed model")
    c.add_argument("--metric", choices=("acc", "acc_norm"), default="acc",
                   help="accuracy to compare (acc_norm falls back to acc where a task has none); default acc")
    c.add_argument("--out", help="also write the comparison as Markdown here")
    c.set_defaults(func=run_compare)


def run_eval(args) -> int:
    import torch

    from ..sources import load_model
    from . import evaluate
    from .report import render_results, write_json

    from . import check_data, data, parse_tasks

    tasks = parse_tasks(args.tasks)  # fail on a typo or missing data before spending time on loading the model
    if args.out and not args.out.endswith(".json"):
        raise JointRankError(f"--out must name a .json file, got {args.out}")
    if args.out:
        from ..precheck import check_json_out

        check_json_out(args.out, "--out", parent_must_exist=False)  # write_json creates the directories
    check_data(tasks, data.resolve_data_dir(args.data_dir))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, source = load_model(args.model, dtype=getattr(torch, args.dtype))

    def save_partial(partial: dict) -> None:  # a long run keeps what it has measured if it is stopped
        partial["model"]["source_kind"] = source.kind
        write_json(partial, args.out)

    results = evaluate(
        model, tokenizer, tasks, data_dir=args.data_dir, limit=args.limit, seqlen=args.seqlen,
        max_windows=args.max_windows, batch_size=args.batch_size, ppl_batch_size=args.ppl_batch_size,
        window_bos=args.window_bos, seed=args.seed, progress=not args.no_progress, model_spec=args.model,
        model_dir=source.path if os.path.isdir(source.path) else None,
        command=_command_line(), on_progress=save_partial if args.out else None,
    )
    results["model"]["source_kind"] = source.kind
    text = render_results(results)
    if args.out:
        out = write_json(results, args.out)
        out.with_suffix(".md").write_text(text, encoding="utf-8")
        print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    print(text)
    return 0


def _command_line() -> str:
    prog = ["jointrank"] if Path(sys.argv[0]).name == "jointrank" else [Path(sys.executable).name, "-m", "jointrank.cli"]
    return shlex.join([*prog, *sys.argv[1:]])


def run_compare(args) -> int:
    from .report import compare, read_json, render_compare

    cmp = compare(read_json(args.base), read_json(args.compressed), metric=args.metric)
    print(render_compare(cmp, markdown=False), end="")
    if args.out:
        Path(args.out).write_text(render_compare(cmp, markdown=True), encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
