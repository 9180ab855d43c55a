"""What healing and self-generated calibration buy on Gemma-3-270M at 10/20/30% of the decoder parameters.

    python research/bench/quality.py run [--only ROW,...] [--budgets 0.1,0.2] [--max-minutes 60]   # perplexity points
    python research/bench/quality.py zeroshot --only ROW,... [--budgets 0.1] [--dense]              # + zero-shot
    python research/bench/quality.py bos --only ROW,... [--budgets 0.1] [--dense]   # + BOS windows, for old points
    python research/bench/quality.py report                     # results/quality.md + quality.png from results/quality.json

Another model or a lighter protocol (the scale study, research/bench/scale.py): global options before the command,
forwarded to every point, e.g. `quality.py --model smollm2-135m --results results/scale/smollm2-135m.json run ...`
(--windows, --zs-limit, --eval-dtype bfloat16 for the models too slow for the full protocol on 2 cores).

Every point runs in a fresh subprocess (`python research/bench/quality.py point ROW BUDGET`), so its wall time and peak RSS
are its own: load the dense model, sample or read calibration text, plan, compress, heal (timed: calibration
sampling, compression and healing separately), then
  * WikiText-2 (raw) test perplexity on WINDOWS windows of SEQLEN tokens drawn with seed WINDOW_SEED from all
    windows of the split, the same windows for every point; per-window mean NLL kept, so every row is paired per
    window against dense;
  * (`zeroshot`, for the points asked for) the paper's seven tasks on ZS_LIMIT nested seeded documents each
    (seed 1234: the same documents for every point), per-document correctness kept for pairing against dense.
`run` and `zeroshot` are resumable: each point is written to results/quality.json as soon as it is measured and
skipped when present; a point that fails is recorded with its error. A healed point stopped before it is measured
resumes after compression (its compressed model, calibration windows and teacher states are kept before it distils)
and within distillation (its state every HEAL_SAVE_EVERY steps), while the code under src/jointrank is unchanged. Rows are defined in ROWS; adding a row and
running `run --only NAME` measures only that row. One heavy job at a time: run nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script (python research/bench/...): make `research` importable
    sys.path.insert(0, str(REPO))

from research.common import mean_se  # noqa: E402

OUT_MD = REPO / "results" / "quality.md"
OUT_PNG = REPO / "results" / "quality.png"
DATA = Path(os.environ.get("JOINTRANK_DATA", REPO.parent / "shared" / "data"))
C4_FILE = DATA / "c4_calibration" / "exllamav2_c4.utf8"
CACHE = Path(os.environ.get("JOINTRANK_CACHE", REPO / ".cache"))  # self-generated text (gitignored)

BUDGETS = (0.10, 0.20, 0.30)
SEQLEN, WINDOW_SEED = 512, 1234
ZS_TASKS = ("piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "arc_easy", "arc_challenge")


@dataclass
class Protocol:
    """What a run measures and where it is written; the defaults are results/quality.md's (Gemma-3-270M, full
    protocol). Set once from the global options in main() and forwarded to every point's subprocess."""

    model: str = "gemma-3-270m"
    results: Path = REPO / "results" / "quality.json"
    windows: int = 32
    zs_limit: int = 250
    eval_dtype: str = "float32"  # the model is built in float32; only the evaluation runs in this dtype
    head_dtype: str | None = None  # distillation's LM-head precision (None: the tool's default)

    def argv(self) -> list[str]:
        return ["--model", self.model, "--results", str(self.results), "--windows", str(self.windows),
                "--zs-limit", str(self.zs_limit), "--eval-dtype", self.eval_dtype,
                *(["--head-dtype", self.head_dtype] if self.head_dtype else [])]


P = Protocol()
CAL_TOKENS = 16384  # calibration tokens, C4 or self-generated, in windows of 512
HEAL_STEPS, HEAL_LR = 100, 1e-4

ALL = {"qk": "joint", "gate_up": "joint", "v": "separate", "o": "separate", "down": "separate"}

# structure name -> (group rules or a preset name, method, allocation, prior); budgets where it is the one to run
STRUCTURES = {
    "paper": (None, "svd", "uniform", None),  # paper-10 at 10%, paper-20 above (the paper's own settings)
    "best-free": (None, "svd", "global", None),  # results/methods.md's best data-free row at each budget
    "svd_llm": (ALL, "svd_llm", "global", "flat"),  # global SVD-LLM: best data-aware at 10%
    "llm_rom": (ALL, "llm_rom", "global", "flat"),  # global LLM-ROM: best data-aware at 20% and 30%
    # issue #15: structure and ranks per group from the estimated loss (planning.loss), SVD-LLM factors
    "loss-svd_llm": (ALL, "svd_llm", "loss", None),
    "loss-llm_rom": (ALL, "llm_rom", "loss", None),
    # issue #15: global SVD-LLM with every unit's basis shared by 2 adjacent layers (the same budget buys higher
    # ranks); its twin at equal parameters is "svd_llm" (per-layer joint Q/K and gate/up, per-layer separate rest)
    "xl2-svd_llm": (ALL, "svd_llm", "global", "flat"),
    # the same with only down_proj shared (its basis, 2048 x k, is 76% of its factors on Gemma-3-270M: where
    # sharing saves most); the other groups per layer
    "xl2down-svd_llm": (ALL, "svd_llm", "global", "flat"),
}
# structure -> (layers sharing a basis, the groups that share or None for all); others share nothing
SHARED = {"xl2-svd_llm": (2, None), "xl2down-svd_llm": (2, ["down"])}
CALIBRATIONS = ("none", "c4", "self")
HEALS = ("none", "refit", "distill", "refit+distill", "distill-lr3e-5", "distill32-lr3e-5", "distill-lr1e-5")
# a heal name -> (the tool's healing kind, distillation learning rate, steps): the recorded recipe's lr 1e-4 lowers
# perplexity on windows started with BOS far less than 3e-5 or 1e-5 do, and at 3e-5 all of it comes in the first 32
# steps (results/heal_zeroshot.md)
HEAL_RECIPES = {"distill-lr3e-5": ("distill", 3e-5, HEAL_STEPS), "distill32-lr3e-5": ("distill", 3e-5, 32),
                "distill-lr1e-5": ("distill", 1e-5, HEAL_STEPS)}


def heal_recipe(heal: str) -> tuple[str, float, int]:
    """(healing kind for jointrank.heal, distillation lr, distillation steps) of a row's heal name."""
    return HEAL_RECIPES.get(heal, (heal, HEAL_LR, HEAL_STEPS))


def row_name(structure: str, calibration: str, heal: str) -> str:
    return f"{structure}/{calibration}/{heal}"


def parse_row(name: str) -> tuple[str, str, str]:
    try:
        structure, calibration, heal = name.split("/")
    except ValueError:
        raise SystemExit(f"row names are STRUCTURE/CALIBRATION/HEAL, got {name!r}") from None
    if structure not in STRUCTURES or calibration not in CALIBRATIONS or heal not in HEALS:
        raise SystemExit(f"unknown row {name!r}: structures {list(STRUCTURES)}, calibrations {list(CALIBRATIONS)}, "
                         f"heals {list(HEALS)}")
    method = STRUCTURES[structure][1]
    needs = method in ("svd_llm", "llm_rom", "asvd") or heal != "none"
    if needs and calibration == "none":
        raise SystemExit(f"row {name!r} needs calibration text (c4 or self)")
    if not needs and calibration != "none":
        raise SystemExit(f"row {name!r}: a data-free row without healing takes no calibration")
    return structure, calibration, heal


def config_for(structure: str, budget: float):
    from jointrank import PRESETS, GroupRule, JointRankConfig

    rules, method, allocation, _ = STRUCTURES[structure]
    preset = None
    if structure == "paper":
        preset = "paper-10" if budget <= 0.10 else "paper-20"
    elif structure == "best-free":  # methods.md: global-paper-10 at 5-10%, global-balanced-residual at 20-30%
        if budget <= 0.10:
            preset = "paper-10"
        else:
            rules, method = ALL, "balanced:norm"
    if preset is not None:
        rules = dict(PRESETS[preset].rules)
    else:
        rules = {g: GroupRule(m) for g, m in rules.items()}
    share_layers, share_groups = SHARED.get(structure, (1, None))
    return JointRankConfig(rules=rules, target=budget, scope="decoder", method=method, allocation=allocation,
                           preset=preset, allocation_prior=prior_for(structure, budget) or "flat",
                           share_layers=share_layers, share_groups=share_groups)


def config_for_model(structure: str, budget: float, model):
    """config_for, fitted to the model, and what was changed (None when nothing was):

    - the paper's 10% structure (separate Q and K) cannot remove 10% of a decoder whose attention holds few
      parameters (Qwen2.5-Coder's grouped-query attention beside a wide MLP: at rank 1 it removes 5.9% on the 1.5B
      model), so paper and best-free take their 20% structure there (paper-20; all groups, balanced);
    - the residual prior reads the norms after each block (Gemma-2/3), so on other families best-free's global
      allocation takes the flat prior.
    """
    from jointrank import JointRankConfig, JointRankError, plan_for

    config, changed = config_for(structure, budget), []
    if structure in ("paper", "best-free") and budget <= 0.10:
        try:  # the rank-1 capacity of the structure does not depend on the allocation: count it uniformly
            plan_for(model, JointRankConfig(rules=config.rules, target=budget, scope="decoder"))
        except JointRankError:
            config = config_for(structure, 0.20)
            config.target = budget
            changed.append(f"{config.preset or 'all groups, balanced'} structure (the 10% one cannot remove "
                           f"{budget:.0%} of this decoder)")
    if config.allocation_prior == "residual" and not any(n.endswith("post_feedforward_layernorm.weight")
                                                         for n, _ in model.named_parameters()):
        config.allocation_prior = "flat"
        changed.append("flat prior (the residual prior needs post-block norms)")
    return config, "; ".join(changed) or None


def prior_for(structure: str, budget: float) -> str | None:
    if structure == "best-free":
        return "flat" if budget <= 0.10 else "residual"
    return STRUCTURES[structure][3]


def compress_flags(row: str, budget: float) -> list[str]:
    """The `jointrank compress` flags that build `row` at `budget` as build() does: the same config, calibration and
    distillation settings (tests/test_experiments.py parses them through the CLI). README's table quotes them."""
    structure, calibration, heal = parse_row(row)
    rules, method, allocation, _ = STRUCTURES[structure]
    if rules is not ALL:  # the preset rows are the paper's, not a setting to recommend
        raise ValueError(f"{structure} rows are built from a preset: no compress flags")
    flags = ["--target", f"{budget:g}", "--scope", "decoder"]
    for group, rule in ALL.items():
        flags += [f"--{group.replace('_', '-')}", rule]
    flags += ["--method", method, "--allocation", allocation]
    prior = prior_for(structure, budget)
    if allocation == "global" and prior not in (None, "flat"):
        flags += ["--allocation-prior", prior]
    share_layers, share_groups = SHARED.get(structure, (1, None))
    if share_layers > 1:
        flags += ["--share-layers", str(share_layers)] + (["--share-groups", ",".join(share_groups)]
                                                           if share_groups else [])
    if calibration != "none":
        flags += ["--calibration", "self" if calibration == "self" else str(C4_FILE),
                  "--calibration-tokens", str(CAL_TOKENS)]
    kind, lr, steps = heal_recipe(heal)
    if kind != "none":
        from jointrank.heal import DistillSettings

        flags += ["--heal", kind]
        if "distill" in kind and steps != DistillSettings.steps:
            flags += ["--heal-steps", str(steps)]
        if "distill" in kind and lr != DistillSettings.lr:
            flags += ["--heal-lr", f"{lr:g}"]
    return flags


def structure_label(structure: str, budget: float) -> str:
    c = config_for(structure, budget)
    if structure == "paper":
        return f"{c.preset} (svd, uniform)"
    groups = c.preset or "+".join(f"{g}:{r.structure}" for g, r in c.rules.items())
    shared = (f", {'+'.join(c.share_groups) if c.share_groups else 'all'} bases shared by {c.share_layers} layers"
              if c.share_layers > 1 else "")
    return f"{groups} ({c.method}, {c.allocation}{', ' + prior_for(structure, budget) + ' prior' if c.allocation == 'global' else ''}{shared})"


# ------------------------------------------------------------------------------------------------ measurements


def eval_windows(tokenizer):
    import torch

    from jointrank.evaluate import data
    from jointrank.evaluate.perplexity import load_text, make_windows

    text = load_text("wikitext2", data.resolve_data_dir(str(DATA)))
    all_windows = make_windows(tokenizer(text, return_tensors="pt").input_ids[0], SEQLEN)
    pick = torch.randperm(len(all_windows), generator=torch.Generator().manual_seed(WINDOW_SEED))[:P.windows]
    pick = pick.sort().values
    return all_windows[pick], pick.tolist(), len(all_windows)


def measure_perplexity(model, tokenizer) -> dict:
    from jointrank.evaluate.perplexity import start_with_bos, window_nll

    def per_window_nll(rows) -> list[float]:
        out = []
        for row in rows:
            nll, count = window_nll(model, row.unsqueeze(0))
            out.append(nll / count)
        return out

    windows, picked, available = eval_windows(tokenizer)
    t = time.perf_counter()
    per_window = per_window_nll(windows)
    mean = sum(per_window) / len(per_window)
    out = {"perplexity": math.exp(mean), "mean_nll": mean, "per_window_nll": per_window, "windows": picked,
           "windows_available": available, "seqlen": SEQLEN}
    if tokenizer.bos_token_id is not None:
        # the same windows started with BOS, as text is seen in use: all but the first window above start mid-text
        # without it, which on Gemma scores the first positions far worse and lets a compressed model differ from
        # dense there for no reason a user would meet (results/heal_zeroshot.md)
        out["per_window_nll_bos"] = per_window_nll(start_with_bos(windows, tokenizer.bos_token_id))
        out["perplexity_bos"] = math.exp(sum(out["per_window_nll_bos"]) / len(windows))
    out["seconds"] = time.perf_counter() - t
    return out


def measure_zeroshot(model, tokenizer) -> dict:
    from jointrank.evaluate import evaluate

    t = time.perf_counter()
    res = evaluate(model, tokenizer, list(ZS_TASKS), data_dir=str(DATA), limit=P.zs_limit, progress=False)["results"]
    accs = {t_: res[t_]["acc"] for t_ in ZS_TASKS}
    ses = {t_: res[t_].get("acc_stderr") for t_ in ZS_TASKS}
    return {"acc": accs, "acc_se": ses, "avg": sum(accs.values()) / len(accs),
            "avg_se": math.sqrt(sum(s**2 for s in ses.values() if s is not None)) / len(accs), "limit": P.zs_limit,
            "per_doc": {t_: res[t_].get("per_doc", {}).get("acc") for t_ in ZS_TASKS},
            "seconds": time.perf_counter() - t}


class PeakRSS:
    """The process's peak RSS, overall and per phase. On Linux each phase's own peak is read from /proc/self/status
    (VmHWM) and the mark is reset between phases (/proc/self/clear_refs), so a phase that peaks lower than an earlier
    one is still measured; the overall peak is the largest of them. Elsewhere only the overall high-water mark."""

    def __init__(self):
        self.overall = 0.0
        self.own: dict[str, float] = {}  # phase -> its own peak (Linux only)
        self.after: dict[str, float] = {}  # phase -> overall peak when it ended

    @staticmethod
    def _hwm() -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
        except OSError:
            pass
        return None

    def _peak_with(self, hwm: float | None) -> float:
        mark = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
        return max(self.overall, mark)

    def peak(self) -> float:
        return self._peak_with(self._hwm())

    def end(self, phase: str) -> None:
        hwm = self._hwm()
        self.overall = self.after[phase] = self._peak_with(hwm)
        if hwm is None:
            return
        self.own[phase] = hwm
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass


PEAKS = PeakRSS()


def peak_rss_gib() -> float:
    return PEAKS.peak()


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def compress_stage(name: str, budget: float, structure: str, cal_kind: str, heal: str, *, progress: bool,
                   fresh_cache: bool):
    """build's first part: load dense, make the calibration, take the healing reference, plan and compress; returns
    (model, tokenizer, calibration, teacher, facts, CompressionResult)."""
    import torch

    from jointrank import compress_, plan_for
    from jointrank.heal import healing_reference
    from jointrank.methods import parse
    from jointrank.methods.calibration import load_text
    from jointrank.methods.selfgen import self_calibration
    from jointrank.sources import load_model

    t0 = time.perf_counter()
    model, tokenizer, _ = load_model(P.model)
    facts = {"load_seconds": time.perf_counter() - t0}
    # the peak RSS after each phase (only ever rises) and each phase's own peak: which phase sets the peak
    PEAKS.end("load")
    facts["peak_rss_gib_after"], facts["peak_rss_gib_in"] = PEAKS.after, PEAKS.own
    config, changed = config_for_model(structure, budget, model)
    if changed:
        facts["config_changed"] = changed
    calibration = None
    t = time.perf_counter()
    if cal_kind == "c4":
        calibration = load_text(C4_FILE, tokenizer, tokens=CAL_TOKENS, seqlen=512, seed=0)
    elif cal_kind == "self" and fresh_cache:
        with tempfile.TemporaryDirectory() as tmp:
            calibration = self_calibration(model, tokenizer, CAL_TOKENS, cache_dir=tmp, progress=progress)
        shared = CACHE / Path(calibration.provenance["cache_file"]).name
        if shared.is_file():
            from safetensors.torch import load_file

            facts["sampling_matches_cache"] = bool(torch.equal(load_file(str(shared))["input_ids"],
                                                               calibration.input_ids))
        facts["sampling_seconds"] = calibration.provenance["sampling_seconds"]
        facts["sampling_from_cache"] = False
    elif cal_kind == "self":
        calibration = self_calibration(model, tokenizer, CAL_TOKENS, cache_dir=CACHE, progress=progress)
        prov = calibration.provenance
        facts["sampling_seconds"] = prov.get("sampling_seconds")
        facts["sampling_from_cache"] = prov["from_cache"]
        if prov["from_cache"]:  # the cache file records how long sampling took when it was made
            from safetensors import safe_open

            with safe_open(prov["cache_file"], "pt") as f:
                facts["sampling_seconds"] = json.loads(f.metadata()["jointrank_selfgen"])["seconds"]
    if calibration is not None and (calibration.provenance or {}).get("kind") == "self-generated":
        # how the text was sampled and how repetitive it is (points measured before the loop guards lack this)
        facts["self_text"] = {k: v for k, v in calibration.provenance.items()
                              if k not in ("kind", "fingerprint", "cache_file", "from_cache", "sampling_seconds")}
    facts["calibration_seconds"] = time.perf_counter() - t
    PEAKS.end("calibration")
    t = time.perf_counter()
    teacher = healing_reference(model, calibration, heal, progress=progress)  # before any weight changes
    plan = plan_for(model, config, calibration=calibration, progress=progress)  # loss allocation measures on it
    PEAKS.end("plan")
    method, _ = parse(config.method)
    result = compress_(model, plan, progress=progress, calibration=calibration if method.needs_calibration else None)
    facts["compress_seconds"] = time.perf_counter() - t
    PEAKS.end("compress")
    facts.update(params_decoder_before=result.params_decoder_before, params_decoder_after=result.params_decoder_after,
                 decoder_reduction=1 - result.params_decoder_after / result.params_decoder_before,
                 params_total_after=result.params_total_after, units_factorised=len(result.units))
    return model, tokenizer, calibration, teacher, facts, result


STAGE_FACTS = "facts.json"  # written last: its presence says the compressed stage is complete


def save_compressed_stage(stage: Path, model, tokenizer, result, calibration, teacher: dict, facts: dict) -> None:
    """What distillation starts from, kept beside its state so that a point stopped during healing (a session's
    end) resumes after compression: the compressed model as a jointrank checkpoint, the calibration windows, the
    teacher's states and the facts measured so far. Deleted with the distillation state once the point is measured."""
    import jointrank
    from safetensors.torch import save_file

    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    jointrank.save(model, tokenizer, stage / "model", result, source=P.model)
    tensors = {"input_ids": calibration.input_ids.contiguous()}
    tensors.update({f"teacher/{i}": h.detach().cpu().contiguous() for i, h in teacher.items()})
    save_file(tensors, str(stage / "start.safetensors"))
    meta = {"facts": facts, "calibration": {"source": calibration.source, "seed": calibration.seed,
                                             "provenance": calibration.provenance}}
    (stage / STAGE_FACTS).write_text(json.dumps(meta, default=str))


def load_compressed_stage(stage: Path):
    """(model, tokenizer, calibration, teacher, facts) as save_compressed_stage kept them; the facts say so."""
    import jointrank
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from jointrank.methods.calibration import Calibration

    meta = json.loads((stage / STAGE_FACTS).read_text())
    model = jointrank.load(stage / "model", verify_checksums=True)
    tokenizer = AutoTokenizer.from_pretrained(str(stage / "model"))
    tensors = load_file(str(stage / "start.safetensors"))
    device = next(model.parameters()).device
    teacher = {int(k.split("/", 1)[1]): v.to(device) for k, v in tensors.items() if k.startswith("teacher/")}
    calibration = Calibration(tensors["input_ids"], **meta["calibration"])
    facts = {**meta["facts"], "resumed_after_compress": True}
    return model, tokenizer, calibration, teacher, facts


def build(name: str, budget: float, *, progress: bool = False, fresh_cache: bool = False, with_result: bool = False,
          expect_losses: list[float] | None = None):
    """Load dense, calibrate, compress and heal one point; returns (model, tokenizer, facts about the run).

    `fresh_cache`: sample the self-generated text again into an empty cache (so the sampling is timed in this run,
    as a user without a cache pays it) and record whether it is token-identical to the shared cache's copy.
    `with_result`: also return compress_'s CompressionResult (to save the model as a checkpoint).
    `expect_losses`: a measured build's distillation losses; the build stops with NotTheMeasuredModel at the first
    step that does not repeat them.
    """
    import torch

    from jointrank.heal import DistillSettings, heal_

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    structure, cal_kind, heal_name = parse_row(name)
    heal, heal_lr, heal_steps = heal_recipe(heal_name)
    busy0, own0 = busy_cpu_seconds(), own_cpu_seconds()
    t0 = time.perf_counter()
    stage = heal_state_dir(name, budget) / "compressed"
    if heal != "none" and not (with_result or fresh_cache) and (stage / STAGE_FACTS).is_file():
        model, tokenizer, calibration, teacher, facts = load_compressed_stage(stage)
        result = None
        # the stopped run's phases stay on record: peaks (this process's from here on), wall and others' CPU time
        PEAKS.end("resume")
        for mine, kept in ((PEAKS.after, facts["peak_rss_gib_after"]), (PEAKS.own, facts["peak_rss_gib_in"])):
            for phase, gib in kept.items():
                mine.setdefault(phase, gib)
        PEAKS.overall = max([PEAKS.overall, *facts["peak_rss_gib_after"].values()])
        facts["peak_rss_gib_after"], facts["peak_rss_gib_in"] = PEAKS.after, PEAKS.own
        t0 -= facts["stage_wall_seconds"]
        busy0 -= facts["stage_other_cpu_seconds"]
    else:
        model, tokenizer, calibration, teacher, facts, result = compress_stage(
            name, budget, structure, cal_kind, heal, progress=progress, fresh_cache=fresh_cache)
        if heal != "none" and isinstance(teacher, dict):  # distillation alone: a stopped point resumes from here
            facts["stage_wall_seconds"] = time.perf_counter() - t0
            facts["stage_other_cpu_seconds"] = max(0.0, (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0))
            save_compressed_stage(stage, model, tokenizer, result, calibration, teacher, facts)
    if heal != "none":
        t = time.perf_counter()
        precision = {"head_dtype": P.head_dtype} if P.head_dtype else {}
        distill = DistillSettings(steps=heal_steps, lr=heal_lr, **precision)
        # saved every HEAL_SAVE_EVERY steps: a point stopped mid-distillation (a session's end) continues there, with
        # the result an uninterrupted run gives; run_point deletes the state once the point is measured
        report = heal_(model, teacher, calibration, heal, distill, state_dir=heal_state_dir(name, budget),
                       save_every=HEAL_SAVE_EVERY, progress=progress, release_teacher=True,
                       on_step=None if expect_losses is None else follow_losses(expect_losses))
        facts["heal_seconds"] = time.perf_counter() - t
        PEAKS.end("heal")
        from jointrank.architectures import count_parameters

        facts["params_total_after_heal"] = count_parameters(model)
        facts["heal"] = {k: v for k, v in report.items() if k != "refit"}
        if report.get("distill", {}).get("resumed_from"):  # its build time covers only the steps after it
            facts["heal_resumed_from_step"] = report["distill"]["resumed_from"]
        if "refit" in report:
            facts["heal"]["refit"] = {k: v for k, v in report["refit"].items() if k != "units"}
        del teacher
    facts["calibration_tokens"] = calibration.tokens if calibration is not None else 0
    facts["compress_heal_seconds"] = (facts["calibration_seconds"] + facts["compress_seconds"]
                                      + facts.get("heal_seconds", 0.0))
    if cal_kind == "self" and facts["sampling_from_cache"]:
        # the wall time a user pays without a cache: sampling as measured when the cache was made
        facts["compress_heal_seconds"] += facts["sampling_seconds"] or 0.0
    facts["peak_rss_gib_compress"] = peak_rss_gib()
    facts["code_digest"] = code_digest()
    # how much CPU other processes took while this one built: a timing is only a verdict on a quiet machine
    facts["other_cpu_seconds"] = max(0.0, (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0))
    facts["build_wall_seconds"] = time.perf_counter() - t0
    return (model, tokenizer, facts, result) if with_result else (model, tokenizer, facts)


def cmd_point(args) -> int:
    """One point in this process; prints its JSON on the last line of stdout."""
    budget = float(args.budget)
    load_start = os.getloadavg()[0]
    if args.name == "dense":
        import torch

        from jointrank.sources import load_model

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        model, tokenizer, _ = load_model(P.model)
        facts = {}
    else:
        expect = json.loads(Path(args.expect_losses).read_text()) if args.expect_losses else None
        try:
            model, tokenizer, facts = build(args.name, budget, progress=args.progress, fresh_cache=args.fresh_cache,
                                            expect_losses=expect)
        except NotTheMeasuredModel as e:
            print(f"not the measured model: {e}; run the point again instead (quality.py run --again --only "
                  f"{args.name} --budgets {args.budget})", file=sys.stderr, flush=True)
            return 4
    point = {"row": args.name, "budget": budget, **facts, "load_avg_1min_built": os.getloadavg()[0]}
    if P.eval_dtype != "float32":
        import torch

        model.to(getattr(torch, P.eval_dtype))
    if args.perplexity or not args.zeroshot:
        point["perplexity"] = measure_perplexity(model, tokenizer)
    if args.zeroshot:
        point["zeroshot"] = measure_zeroshot(model, tokenizer)
    point["peak_rss_gib"] = peak_rss_gib()
    point["load_avg_1min"] = os.getloadavg()[0]
    point["load_avg_1min_start"] = load_start
    print("POINT " + json.dumps(point), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------- the sweep


def load_results() -> dict:
    if P.results.is_file():
        return json.loads(P.results.read_text())
    return {"points": []}


def settings() -> dict:
    extra = {} if P.eval_dtype == "float32" else {"eval_dtype": P.eval_dtype}
    return {"model": P.model, "budgets": list(BUDGETS), "scope": "decoder", **extra,
            "perplexity": {"text": "wikitext-2-raw test", "seqlen": SEQLEN, "windows": P.windows, "seed": WINDOW_SEED},
            "zeroshot": {"tasks": list(ZS_TASKS), "limit": P.zs_limit, "seed": 1234},
            "calibration": {"c4": str(C4_FILE.relative_to(DATA.parent)) if C4_FILE.is_relative_to(DATA.parent)
                            else str(C4_FILE), "tokens": CAL_TOKENS, "seqlen": 512,
                            "self": "sampled from the dense model: temperature 1, top-p 0.95, seed 0, bfloat16, "
                                    "windows of 512 starting with BOS"},
            "heal": {"distill_steps": HEAL_STEPS, "lr": HEAL_LR, "window_tokens": 512,
                     "recipes": {k: {"kind": v[0], "lr": v[1], "steps": v[2]} for k, v in HEAL_RECIPES.items()}}}


def save_results(results: dict) -> None:
    from research.common import write_json

    results["settings"] = settings()
    results["targets"] = targets(results)
    write_json(P.results, results)


HEAL_SAVE_EVERY = 25  # distillation steps between saved states (Qwen2.5-Coder-1.5B's state is ~12 GB)


def heal_state_dir(name: str, budget: float) -> Path:
    """Where a point's distillation state is kept while it is built: per model, row, budget and code (a state made
    by other code is never continued)."""
    return CACHE / "heal_state" / P.model / f"{name.replace('/', '_')}@{budget:g}-{code_digest()}"


def run_point(name: str, budget: float, *, zeroshot: bool, perplexity: bool = True,
              fresh_cache: bool = False, expect_losses: list[float] | None = None) -> dict:
    """Build and measure one point in a child process (its peak RSS is its own); `expect_losses`: see build."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *P.argv(), "point", name, str(budget)]
    cmd += ["--zeroshot"] * zeroshot + ["--perplexity"] * perplexity + ["--fresh-cache"] * fresh_cache
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if expect_losses is not None:
            (Path(tmp) / "losses.json").write_text(json.dumps(expect_losses))
            cmd += ["--expect-losses", str(Path(tmp) / "losses.json")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("POINT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"row": name, "budget": budget, "error": " | ".join(tail)}
    point = json.loads(lines[-1][len("POINT "):])
    point["process_seconds"] = time.perf_counter() - t
    if name != "dense":  # measured: a later rebuild distils again from the start, as a first build does
        shutil.rmtree(heal_state_dir(name, budget), ignore_errors=True)
    return point


def cmd_run(args) -> int:
    deadline = time.monotonic() + args.max_minutes * 60
    results = load_results()
    names = args.only.split(",") if args.only else []
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(BUDGETS)
    todo = [("dense", 0.0)] + [(n, b) for b in budgets for n in names]
    digest = code_digest()
    for name, budget in todo:
        if name != "dense":
            parse_row(name)
        old = next((p for p in results["points"] if p["row"] == name and p["budget"] == budget
                    and "perplexity" in p), None)
        # --again: rebuild what the current code has not measured (resumable: a point it made is not redone)
        if old is not None and not (args.again and name != "dense" and old.get("code_digest") != digest):
            continue
        if time.monotonic() > deadline:
            print("time budget of this piece used up; run again to continue", flush=True)
            return 3
        point = run_point(name, budget, zeroshot=args.zeroshot and name != "dense", fresh_cache=args.fresh_cache)
        if old is not None and "error" in point:  # a failed rebuild never replaces a measurement
            print(f"{name} @ {budget:.0%}: FAILED {point['error']} (the earlier measurement is kept)", flush=True)
            continue
        if old is not None:  # the earlier measurement stays on record beside the new one
            point["earlier"] = old.pop("earlier", []) + [old]
        results["points"] = [p for p in results["points"] if not (p["row"] == name and p["budget"] == budget)]
        results["points"].append(point)
        save_results(results)
        if "error" in point:
            print(f"{name} @ {budget:.0%}: FAILED {point['error']}", flush=True)
        else:
            print(f"{name} @ {budget:.0%}: ppl {point['perplexity']['perplexity']:.2f}, removed "
                  f"{point.get('decoder_reduction', 0):.2%}, compress+heal {point.get('compress_heal_seconds', 0):.0f} s, "
                  f"peak {point.get('peak_rss_gib_compress', point['peak_rss_gib']):.2f} GiB (evaluation included: "
                  f"{point['peak_rss_gib']:.2f})", flush=True)
    return 0


def distill_record(point: dict) -> dict:
    """The distillation report of a point's healing ({} when it did not distil)."""
    return (point.get("heal") or {}).get("distill") or {}


def same_training(point: dict, rebuilt: dict) -> bool:
    """Whether a rebuild trained like the measured point: the same distillation loss at every step (a deterministic
    build repeats them exactly; a changed healing code or setting does not). True when neither distilled."""
    a, b = distill_record(point).get("losses"), distill_record(rebuilt).get("losses")
    if a is None and b is None:
        return True
    return a is not None and b is not None and len(a) == len(b) and all(map(same_loss, a, b))


def same_loss(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


class NotTheMeasuredModel(Exception):
    """A rebuild's distillation left the measured build's loss curve."""


def follow_losses(expected: list[float]):
    """distill_'s on_step for a rebuild: stop at the first step whose loss is not the measured build's (a
    deterministic build repeats them exactly), so a rebuild that cannot be the measured model fails one step into
    its distillation rather than after all of it and the evaluation that follows."""
    def check(step: int, loss: float) -> None:
        if step > len(expected):
            raise NotTheMeasuredModel(f"distillation step {step}: the measured build stopped after {len(expected)}")
        if not same_loss(loss, expected[step - 1]):
            raise NotTheMeasuredModel(f"distillation step {step}: loss {loss!r}, the measured build's "
                                      f"{expected[step - 1]!r}")
    return check


def points_to_rebuild(args, results: dict, missing) -> list[tuple[str, float, dict]]:
    """The measured points named by --only/--budgets (and dense with --dense) for which missing(point) holds."""
    names = (["dense"] if args.dense else []) + (args.only.split(",") if args.only else [])
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(BUDGETS)
    out = []
    for name in names:
        for budget in ([0.0] if name == "dense" else budgets):
            point = next((p for p in results["points"] if p["row"] == name and p["budget"] == budget
                          and "perplexity" in p), None)
            if point is not None and missing(point):
                out.append((name, budget, point))
    return out


def losses_gap(point: dict, rebuilt: dict) -> float:
    """The largest relative difference between two builds' distillation losses, step by step (0 when neither
    distilled; inf when one did and the other did not, or for another number of steps)."""
    a, b = distill_record(point).get("losses") or [], distill_record(rebuilt).get("losses") or []
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=0.0)


def not_same_model(point: dict, rebuilt: dict, *, losses: bool = True) -> str | None:
    """Why a rebuild is not the measured model (another parameter count, or with `losses` other distillation
    losses), or None."""
    if point["row"] == "dense":
        return None
    if rebuilt["params_decoder_after"] != point["params_decoder_after"]:
        return "the rebuilt model has another parameter count than the measured one"
    if losses and not same_training(point, rebuilt):  # e.g. healing code changed since the point ran
        return (f"the rebuilt model's distillation losses differ from the measured one's (by up to "
                f"{losses_gap(point, rebuilt):.1e} relative), so it is not the model that was measured; run the "
                "point again (quality.py run --again) or rebuild it with the settings it was made with")
    return None


def keep_rebuild_timing(point: dict, rebuilt: dict) -> None:
    """A rebuild is another timing of compress + heal: keep it beside the first."""
    point.setdefault("rebuilds", []).append(
        {k: rebuilt.get(k) for k in ("compress_heal_seconds", "sampling_seconds", "sampling_from_cache",
                                     "sampling_matches_cache", "compress_seconds", "heal_seconds",
                                     "peak_rss_gib_compress", "load_avg_1min_start", "load_avg_1min_built",
                                     "other_cpu_seconds", "build_wall_seconds", "code_digest", "peak_rss_gib_after")})


def rebuild_each(args, missing, measure: dict, record, *, follow: bool = False) -> int:
    """Rebuild every point named by args for which missing(point) holds, measuring what `measure` asks of run_point,
    and let record(point, rebuilt) add it: it returns the line to print, or None when nothing was kept (then it
    prints why itself). `follow`: a rebuild stops at the first distillation step that does not repeat the point's
    (see follow_losses). Returns 3 when the time budget (--max-minutes) ran out, else 0."""
    deadline = time.monotonic() + args.max_minutes * 60
    results = load_results()
    for name, budget, point in points_to_rebuild(args, results, missing):
        if time.monotonic() > deadline:
            print("time budget of this piece used up; run again to continue", flush=True)
            return 3
        losses = distill_record(point).get("losses") if follow else None
        z = run_point(name, budget, fresh_cache=args.fresh_cache, expect_losses=losses, **measure)
        if "error" in z:
            print(f"{name} @ {budget:.0%}: FAILED {z['error']}", flush=True)
            continue
        line = record(point, z)
        if line is None:  # the rest may still be rebuildable: go on with them
            continue
        if name != "dense":
            keep_rebuild_timing(point, z)
        save_results(load_results() | {"points": results["points"]})
        print(f"{name} @ {budget:.0%}: {line}", flush=True)
    return 0


def cmd_zeroshot(args) -> int:
    def record(point, z):
        if why := not_same_model(point, z):
            print(f"{point['row']} @ {point['budget']:.0%}: zero-shot NOT RECORDED: {why}", flush=True)
            return None
        point["zeroshot"] = z["zeroshot"]
        point["zeroshot_peak_rss_gib"] = z["peak_rss_gib"]
        return f"zero-shot avg {z['zeroshot']['avg']:.4f}"

    # zero-shot is recorded for the measured model only: its losses must repeat exactly (no windows to compare)
    return rebuild_each(args, lambda p: "zeroshot" not in p, {"zeroshot": True, "perplexity": False}, record,
                        follow=True)


# a rebuild is the measured model when its perplexity on the same windows agrees to this many nats per window (the
# build is deterministic; only the order of float sums may differ between runs)
SAME_NLL_TOL = 1e-3


def cmd_bos(args) -> int:
    """Perplexity on the windows started with BOS for points measured before measure_perplexity recorded it: the
    point is rebuilt, checked to be the measured model (the same parameter count, and every measured window scored
    within SAME_NLL_TOL of the record), and its BOS windows are added beside the old ones."""
    def record(point, z):
        old, new = point["perplexity"], z["perplexity"]
        diff = max(abs(a - b) for a, b in zip(old["per_window_nll"], new["per_window_nll"]))
        # the windows decide, not the losses: a distillation whose float rounding changed since (e.g. how the KL is
        # summed) trains a model that differs in the last bits; if it scores every measured window within
        # SAME_NLL_TOL of the record, its BOS windows measure the recorded model to that precision
        why = not_same_model(point, z, losses=False) or (
            None if old["windows"] == new["windows"] and diff <= SAME_NLL_TOL else
            f"the rebuilt model scores the measured windows differently (by up to {diff:.2g} nats), so it is not "
            f"the measured model; run the point again instead (run --again --only {point['row']} --budgets "
            f"{point['budget']})")
        if why:
            print(f"{point['row']} @ {point['budget']:.0%}: NOT RECORDED: {why}", flush=True)
            return None
        old["per_window_nll_bos"], old["perplexity_bos"] = new["per_window_nll_bos"], new["perplexity_bos"]
        old["bos_added"] = {"max_abs_diff_nll_rebuilt": diff, "code_digest": z.get("code_digest"),
                            "distill_losses_max_rel_diff": losses_gap(point, z)}
        return (f"perplexity {new['perplexity']:.2f} (recorded {old['perplexity']:.2f}), "
                f"with BOS {new['perplexity_bos']:.2f}")

    return rebuild_each(args, lambda p: "per_window_nll_bos" not in p["perplexity"],
                        {"zeroshot": False, "perplexity": True}, record)


# ------------------------------------------------------------------------------------------------------ report


def _by(results) -> dict:
    return {(p["row"], p["budget"]): p for p in results["points"] if "perplexity" in p}


BOS, NO_BOS = "per_window_nll_bos", "per_window_nll"


def nll_key(*points: dict) -> str:
    """The windows to compare points on: started with BOS when every one of them was measured so (the protocol that
    counts: results/heal_zeroshot.md), else the standard windows without it."""
    return BOS if all(BOS in p["perplexity"] for p in points) else NO_BOS


def protocol(key: str) -> str:
    return "windows with BOS" if key == BOS else "windows without BOS"


def paired_nll(a: dict, b: dict, key: str | None = None) -> tuple[float, float]:
    """Mean per-window NLL of a minus b over the same windows, with its paired standard error; `key` (default
    nll_key(a, b)): BOS for the windows started with BOS, NO_BOS for the standard ones."""
    key = key or nll_key(a, b)
    return mean_se([x - y for x, y in zip(a["perplexity"][key], b["perplexity"][key])])


def ppl_ratio(point: dict, dense: dict, key: str | None = None) -> tuple[float, float]:
    """Perplexity relative to dense, exp(mean paired ΔNLL), and the standard error of that ratio (delta method)."""
    d, se = paired_nll(point, dense, key)
    return math.exp(d), math.exp(d) * se


def perplexity_on(point: dict, key: str) -> float | None:
    """A point's perplexity on the windows `key` names (None where it was not measured on them)."""
    return point["perplexity"].get("perplexity_bos" if key == BOS else "perplexity")


def mean_nll(point: dict, key: str) -> float:
    values = point["perplexity"][key]
    return sum(values) / len(values)


def best_by_nll(points: list[dict]) -> dict | None:
    """The point of lowest perplexity, ranked on the windows with BOS among the points measured so when any was
    (rankings never mix the two protocols), else on the standard windows."""
    with_bos = [p for p in points if BOS in p["perplexity"]]
    pool, key = (with_bos, BOS) if with_bos else (points, NO_BOS)
    return min(pool, key=lambda p: mean_nll(p, key)) if pool else None


def zs_retention(point: dict, dense: dict) -> tuple[float, float] | None:
    """Zero-shot average retained (point / dense), and the SE of the paired difference divided by dense's average."""
    z, bz = point.get("zeroshot"), dense.get("zeroshot")
    if not z or not bz:
        return None
    return z["avg"] / bz["avg"], _paired_avg_se(bz, z) / bz["avg"]


def _paired_avg_se(a: dict, b: dict, tasks=ZS_TASKS) -> float:
    """The SE of the difference of two models' task-average accuracies, paired per document within each task."""
    from jointrank.evaluate.report import paired_stderr

    ses = [paired_stderr({"per_doc": {"acc": a["per_doc"][t]}}, {"per_doc": {"acc": b["per_doc"][t]}}, "acc")
           for t in tasks]
    return math.sqrt(sum(s**2 for s in ses if s is not None)) / len(tasks)


def zs_gain(point: dict, base: dict, dense: dict, tasks=ZS_TASKS) -> tuple[float, float] | None:
    """Zero-shot retention `point` keeps beyond `base` (another compressed model of the same dense one), with the SE
    of their difference paired per document: (point's average - base's) / dense's average, over `tasks`."""
    z, zb, bz = point.get("zeroshot"), base.get("zeroshot"), dense.get("zeroshot")
    if not z or not zb or not bz:
        return None

    def avg(r):  # every task: the average as recorded (rounded), so all-task figures stay those reported before
        return r["avg"] if tuple(tasks) == tuple(ZS_TASKS) else sum(r["acc"][t] for t in tasks) / len(tasks)

    return (avg(z) - avg(zb)) / avg(bz), _paired_avg_se(zb, z, tasks) / avg(bz)


NO_USER_DATA = ("none", "self")


def code_digest() -> str:
    """A digest of the jointrank sources a build ran (src/jointrank/**/*.py), so that time and memory are judged on
    the current code's runs, not on those of code since made faster or leaner."""
    import hashlib

    import jointrank

    root = Path(jointrank.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def current_runs(point: dict) -> list[dict]:
    """A point's compress + heal runs (the first, then any rebuild for zero-shot) made by the same code as its latest
    run (all of them when the latest run recorded no code digest)."""
    runs = [point] + point.get("rebuilds", [])
    latest = runs[-1].get("code_digest")
    return [r for r in runs if r.get("code_digest") == latest] if latest else runs


def quietest_timing(point: dict) -> dict:
    """Of the point's runs by its latest code, the one other processes disturbed least (CPU seconds they took
    meanwhile; runs from before that was recorded count as disturbed)."""
    return min(current_runs(point), key=lambda r: r.get("other_cpu_seconds", math.inf))


def current_peak(point: dict) -> float:
    """Peak RSS of compress + heal by the point's latest code (the largest of its runs by that code)."""
    return max(r["peak_rss_gib_compress"] for r in current_runs(point))


def best_no_user_data(by: dict, budget: float, *, zeroshot: bool = False, healed: bool = False) -> dict | None:
    pts = [p for (row, b), p in by.items() if b == budget and row != "dense" and parse_row(row)[1] in NO_USER_DATA
           and (not zeroshot or "zeroshot" in p) and (not healed or parse_row(row)[2] != "none")]
    return best_by_nll(pts)


TARGETS = {0.10: (0.988, 1.05), 0.20: (0.97, 1.3), 0.30: (0.934, 2.0)}


def targets(results: dict) -> list[dict]:
    by = _by(results)
    dense = by.get(("dense", 0.0))
    out = []
    for budget, (retention, ratio) in TARGETS.items():
        best = best_no_user_data(by, budget) if dense else None
        # judged on the windows started with BOS (results/heal_zeroshot.md: without it, healing looks like it
        # recovers what it does not); a row measured only the old way is reported but not counted as met
        bos = best is not None and nll_key(best, dense) == BOS
        measured = math.exp(paired_nll(best, dense, BOS)[0]) if bos else None
        out.append({"name": f"{budget:.0%} removed, no user data: perplexity / dense (windows started with BOS)",
                    "measured": measured, "target": f"<= {ratio}", "met": measured is not None and measured <= ratio,
                    "row": best["row"] if best else None,
                    **({} if bos or best is None else {
                        "note": f"measured only on windows without BOS ({ppl_ratio(best, dense)[0]:.3f}x), which "
                                "flatter healed models (results/heal_zeroshot.md); rebuild it to judge"})})
        zbest = best_no_user_data(by, budget, zeroshot=True) if dense else None
        r = zs_retention(zbest, dense) if zbest else None
        out.append({"name": f"{budget:.0%} removed, no user data: zero-shot retention",
                    "measured": r[0] if r else None, "target": f">= {retention}",
                    "met": r is not None and r[0] >= retention, "row": zbest["row"] if zbest else None})
    for budget in (0.10, 0.20):
        pairs = []
        for (row, b), p in by.items():
            if b != budget or row == "dense" or parse_row(row)[1] != "self":
                continue
            s, _, h = parse_row(row)
            twin = by.get((row_name(s, "c4", h), budget))
            if twin:
                pairs.append((p, twin))
        worst = None
        for p, twin in pairs:  # self minus C4, in paired SEs: the target holds if it holds for every measured pair
            d, se = paired_nll(p, twin)
            z = d / se if se > 0 else 0.0
            if worst is None or z > worst[0]:
                worst = (z, p["row"], protocol(nll_key(p, twin)))
        out.append({"name": f"{budget:.0%}: self-generated calibration within 2 paired SE of C4 (worst pair, in SE)",
                    "measured": worst[0] if worst else None, "target": "<= 2",
                    "met": worst is not None and worst[0] <= 2, "row": worst[1] if worst else None,
                    "pairs": len(pairs), "windows": worst[2] if worst else None})
    # time and memory are judged on what a user runs: at each budget, the best healed row without user data (the one
    # the perplexity target names); the slowest and the largest of all healed rows are reported beside them
    timed = [p for (row, b), p in by.items() if row != "dense" and parse_row(row)[2] != "none"]
    chosen = [p for p in (best_no_user_data(by, b, healed=True) for b in BUDGETS) if p is not None]

    def minutes(p):
        return quietest_timing(p)["compress_heal_seconds"] / 60

    def label(p):
        return f"{p['row']} @ {p['budget']:.0%}"

    slowest = max(chosen, key=minutes) if chosen else None
    out.append({"name": "compress + heal wall time, minutes (best healed row without user data at each budget, "
                        "the slowest of them; each by its quietest run of its latest code)",
                "measured": minutes(slowest) if slowest else None, "target": "<= 20",
                "met": slowest is not None and minutes(slowest) <= 20,
                "row": label(slowest) if slowest else None,
                "per_budget": {label(p): minutes(p) for p in chosen},
                "other_cpu_seconds": quietest_timing(slowest).get("other_cpu_seconds") if slowest else None,
                "slowest_healed_row": ({"row": label(x), "minutes": minutes(x)} if (x := max(timed, key=minutes,
                                                                                             default=None)) else None)})
    out += loss_targets(by)
    heavy = max(chosen, key=current_peak) if chosen else None
    out.append({"name": "compress + heal peak RSS, GiB (best healed row without user data at each budget, the "
                        "largest of them, by its latest code)",
                "measured": current_peak(heavy) if heavy else None, "target": "<= 4 GB (3.73 GiB)",
                "met": heavy is not None and current_peak(heavy) <= 4e9 / 2**30,
                "row": label(heavy) if heavy else None,
                "per_budget": {label(p): current_peak(p) for p in chosen},
                "largest_healed_row": ({"row": label(x), "gib": current_peak(x)} if (x := max(timed, key=current_peak,
                                                                                              default=None)) else None)})
    return out


def best_against_twin(by: dict, budget: float, prefix: str) -> tuple[float, str, str] | None:
    """The row STRUCTURE/C/H with STRUCTURE starting with `prefix` that beats its twin (the same row without the
    prefix) by the most paired standard errors of the per-window NLL difference at `budget`: (z, row, the windows
    compared on: protocol()), or None. Pairs compared on windows started with BOS (text as a model sees it) decide
    whenever there is one; pairs measured only without BOS stand in where there is none."""
    found = []
    for (row, b), p in by.items():
        if b != budget or row == "dense" or not parse_row(row)[0].startswith(prefix):
            continue
        s, c, h = parse_row(row)
        twin = by.get((row_name(s[len(prefix):], c, h), budget))
        if twin is None:
            continue
        d, se = paired_nll(p, twin)
        found.append((d / se if se > 0 else 0.0, row, nll_key(p, twin)))
    on_bos = [x for x in found if x[2] == BOS]
    best = min(on_bos or found, default=None)
    return None if best is None else (best[0], best[1], protocol(best[2]))


def twin_verdicts(per_budget: dict) -> str:
    return "; ".join(f"{k}: {'not measured' if v is None else f'{v[0]:+.1f} SE ({v[1]}, {v[2]})'}"
                     for k, v in per_budget.items())


def cross_layer_target(by: dict) -> dict:
    per_budget = {}
    for b in (0.2, 0.3):
        found = [x for x in (best_against_twin(by, b, prefix) for prefix in ("xl2-", "xl2down-")) if x]
        per_budget[f"{b:.0%}"] = min(found) if found else None
    measured = twin_verdicts(per_budget)
    return {"name": "cross-layer shared bases better than per-layer joint at 20% and 30% (2 paired SE)",
            "measured": measured, "target": "< -2 SE at 20% and 30%",
            "met": all(v is not None and v[0] < -2 for v in per_budget.values())}


def loss_targets(by: dict) -> list[dict]:
    """Issue #15's targets: loss-aware allocation against global (loss-M/C/H against M/C/H, paired per window), at
    every budget; cross-layer shared bases against per-layer units (xl2-M/C/H against M/C/H) at 20% and 30%; 20%
    with C4 at most half of global LLM-ROM's perplexity."""
    per_budget = {f"{budget:.0%}": best_against_twin(by, budget, "loss-") for budget in BUDGETS}
    measured = twin_verdicts(per_budget)
    out = [{"name": "loss-aware allocation better than global allocation at every budget (paired dNLL, in SE)",
            "measured": measured, "target": "< -2 SE at 10%, 20% and 30%",
            "met": all(v is not None and v[0] < -2 for v in per_budget.values())},
           cross_layer_target(by)]
    base = by.get(("llm_rom/c4/none", 0.2))
    c4 = [p for (row, b), p in by.items() if b == 0.2 and row != "dense" and parse_row(row)[1] == "c4"
          and parse_row(row)[0].startswith("loss-")]
    best = best_by_nll(c4)
    ratio = ppl_ratio(best, base)[0] if best and base else None  # exp(mean paired ΔNLL): the ratio of perplexities
    out.append({"name": "20% removed with C4 calibration: perplexity / global LLM-ROM's (llm_rom/c4/none)",
                "measured": ratio, "target": "<= 0.5", "met": ratio is not None and ratio <= 0.5,
                "row": best["row"] if best else None,
                "windows": protocol(nll_key(best, base)) if best and base else None})
    return out


def cmd_report(args) -> int:
    from research.bench.quality_report import write_readme_table, write_report

    results = load_results()
    save_results(results)  # the JSON's targets are recomputed with the report, from the same points
    write_report(results, OUT_MD, OUT_PNG)
    print(f"wrote {OUT_MD.relative_to(REPO)} and {OUT_PNG.relative_to(REPO)}")
    if P.results == Protocol().results and write_readme_table(results, REPO / "README.md"):  # Gemma's, not scale's
        print("wrote README.md's table of recommended settings")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Protocol()
    parser.add_argument("--model", default=defaults.model, help="model alias or path (default %(default)s)")
    parser.add_argument("--results", type=Path, default=defaults.results, help="results JSON (default: quality.json)")
    parser.add_argument("--windows", type=int, default=defaults.windows, help="perplexity windows (default %(default)s)")
    parser.add_argument("--zs-limit", type=int, default=defaults.zs_limit, help="documents per zero-shot task")
    parser.add_argument("--eval-dtype", choices=["float32", "bfloat16"], default=defaults.eval_dtype,
                        help="dtype of the evaluation (the model is built in float32)")
    parser.add_argument("--head-dtype", choices=["float32", "bfloat16"], default=None,
                        help="precision of the LM head in distillation (default: the tool's)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="perplexity points, each in a fresh process, appended to results/quality.json")
    run.add_argument("--only", default="", help="comma-separated rows STRUCTURE/CALIBRATION/HEAL")
    run.add_argument("--budgets", default=None, help="comma-separated fractions (default: 0.1,0.2,0.3)")
    run.add_argument("--max-minutes", type=float, default=60.0, help="start no new point after this long")
    run.add_argument("--zeroshot", action="store_true", help="also zero-shot, in the same process as perplexity")
    run.add_argument("--fresh-cache", action="store_true", help="sample self-generated text again, timed")
    run.add_argument("--again", action="store_true",
                     help="rebuild and remeasure points measured by other code than the current (the earlier "
                     "measurement is kept in the point's 'earlier' list)")
    run.set_defaults(func=cmd_run)
    zs = sub.add_parser("zeroshot", help="zero-shot for measured points (rebuilt: every step is deterministic)")
    zs.add_argument("--only", default="")
    zs.add_argument("--budgets", default=None)
    zs.add_argument("--dense", action="store_true", help="also the dense model")
    zs.add_argument("--max-minutes", type=float, default=60.0)
    zs.add_argument("--fresh-cache", action="store_true",
                    help="sample self-generated text again (timed; checked identical to the cached text)")
    zs.set_defaults(func=cmd_zeroshot)
    bos = sub.add_parser("bos", help="perplexity on the windows started with BOS for points measured without it "
                         "(rebuilt and checked to be the measured model)")
    bos.add_argument("--only", default="")
    bos.add_argument("--budgets", default=None)
    bos.add_argument("--dense", action="store_true", help="also the dense model")
    bos.add_argument("--max-minutes", type=float, default=60.0)
    bos.add_argument("--fresh-cache", action="store_true", help="sample self-generated text again")
    bos.set_defaults(func=cmd_bos)
    point = sub.add_parser("point", help="one point in this process (used by run and zeroshot)")
    point.add_argument("name")
    point.add_argument("budget")
    point.add_argument("--zeroshot", action="store_true", help="measure zero-shot accuracy")
    point.add_argument("--perplexity", action="store_true", help="measure perplexity (default unless --zeroshot)")
    point.add_argument("--fresh-cache", action="store_true", help="sample self-generated text again, timed")
    point.add_argument("--progress", action="store_true")
    point.add_argument("--expect-losses", default=None, metavar="JSON",
                       help="a measured build's distillation losses: stop at the first step that differs (exit 4)")
    point.set_defaults(func=cmd_point)
    report = sub.add_parser("report")
    report.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    global P
    P = Protocol(model=args.model, results=args.results.resolve(), windows=args.windows, zs_limit=args.zs_limit,
                 eval_dtype=args.eval_dtype, head_dtype=args.head_dtype)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
