"""Where evaluation data comes from, and how the reformatted copies become the standard fields again.

Order of precedence for the data dir: the ``--data-dir`` flag, then ``JOINTRANK_DATA``, then nothing. With no data
dir, online users get the hub datasets through lm-eval's own built-in tasks; offline (``HF_HUB_OFFLINE`` or
``HF_DATASETS_OFFLINE`` set) that is impossible, and we say so in one sentence naming the missing files.

Several files in the shared data dir are *derived* copies (see its PROVENANCE.md). Each parser below rebuilds the
record layout of the Hugging Face dataset that lm-eval's built-in task reads, so that the built-in task's own
``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` (and ``process_docs``) apply unchanged, and checks the
official row count and every cross-check the copies allow. A mismatch is a JointRankError, never a silent skip.
"""

from __future__ import annotations

import bz2
import json
import os
import re
from pathlib import Path

from ..errors import JointRankError
from .tasks import TASKS

ENV_VAR = "JOINTRANK_DATA"

def offline() -> bool:
    return any(os.environ.get(v, "").strip() not in ("", "0", "false", "False") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def require_hub(tasks: list[str]) -> None:
    """With no data dir we need the hub: fail at once, in one sentence, if it is switched off or unreachable.

    Probing first matters: unreachable, datasets/lm-eval retry for many minutes before failing obscurely."""
    needed = ", ".join(f for t in tasks if t in TASKS for f in TASKS[t].files)
    hint = f"give --data-dir or {ENV_VAR} holding {needed}"
    if offline():
        raise JointRankError(f"no data dir and the hub is switched off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): {hint}")
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub.constants import ENDPOINT
    except ImportError:
        ENDPOINT = "https://huggingface.co"
    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as exc:
        raise JointRankError(f"no data dir and the hub ({url.hostname}) is unreachable ({exc.__class__.__name__}): {hint}") from None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data dir to read from (flag > env), or None to use the hub. A given dir must exist."""
    chosen, origin = (data_dir, "--data-dir") if data_dir else (os.environ.get(ENV_VAR) or None, ENV_VAR)
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise JointRankError(f"data dir {chosen} (from {origin}) is not a directory")
    return path.resolve()


def require_files(task: str, data_dir: Path | None) -> list[Path]:
    """Paths of TASK's files in DATA_DIR; one clear error if the dir is missing (offline) or incomplete."""
    names = TASKS[task].files
    if data_dir is None:
        raise JointRankError(
            f"{task} needs {', '.join(names)} from a data dir (--data-dir or {ENV_VAR}), and the hub is "
            + ("switched off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline() else "not an option for this set")
        )
    paths = [data_dir / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise JointRankError(f"{task}: missing in data dir: {', '.join(missing)}")
    return paths


def check_data(tasks: list[str], root: Path | None) -> None:
    """Every file TASKS need is in the data dir ROOT, or (no data dir) the hub is reachable; else JointRankError."""
    for task in tasks:
        if root is not None or task == "c4":  # c4 (exllamav2's calibration text) has no hub twin
            require_files(task, root)
    if root is None:
        require_hub(tasks)


def _check_rows(task: str, rows: list) -> list:
    if len(rows) != TASKS[task].rows:
        raise JointRankError(f"{task}: parsed {len(rows)} rows, the official split has {TASKS[task].rows}")
    return rows


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _json(path: Path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ---------------------------------------------------------------------------------------------------------------
# Perplexity texts


def wikitext2_rows(data_dir: Path) -> list[str]:
    """The HF ``wikitext-2-raw-v1`` test rows rebuilt from the release file.

    The HF builder yields each line with its newline, and "" for a whitespace-only line; the standard protocol then
    joins those rows with "\\n\\n". We reproduce the rows exactly so the joined text is the one published numbers use.
    """
    (path,) = require_files("wikitext2", data_dir)
    with open(path, encoding="utf-8", newline="") as fh:
        lines = fh.read().splitlines(keepends=True)
    return _check_rows("wikitext2", [line if line.strip() else "" for line in lines])


def c4_documents(data_dir: Path) -> list[str]:
    """exllamav2's 118 C4-style web documents, one per line (not verifiably C4 validation; see PROVENANCE.md)."""
    (path,) = require_files("c4", data_dir)
    with open(path, encoding="utf-8") as fh:
        docs = [line.rstrip("\n") for line in fh if line.strip()]
    if len(docs) != 118:
        raise JointRankError(f"c4: parsed {len(docs)} documents from {path}, expected 118")
    return docs


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot sets, each rebuilt in the schema of the HF dataset the built-in lm-eval task reads.


def piqa_docs(data_dir: Path) -> list[dict]:
    """baber/piqa schema: goal, sol1, sol2, label (0/1). The original release: jsonl + line-aligned labels."""
    docs_path, labels_path = require_files("piqa", data_dir)
    docs = _jsonl(docs_path)
    labels = [line.strip() for line in open(labels_path, encoding="utf-8") if line.strip()]
    if len(labels) != len(docs):
        raise JointRankError(f"piqa: {len(docs)} questions but {len(labels)} labels")
    return _check_rows("piqa", [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(docs, labels)])


_ARC_HEAD = "Please choose the correct answer to the question: "
_ARC_CHOICE = re.compile(r"(?:^| )Answer(\d): ")


def _parse_arc_instruction(text: str) -> tuple[str, list[str]]:
    """LLM-Adapters' ARC prompt -> (question, choice texts). Format:
    '<head><question>\\n\\nAnswer1: a Answer2: b ...\\n\\nAnswer format: answer1/...'."""
    if not text.startswith(_ARC_HEAD):
        raise ValueError("unexpected head")
    body = text[len(_ARC_HEAD):]
    question, sep, rest = body.rpartition("\n\nAnswer format: ")[0].rpartition("\n\n")
    if not sep:
        raise ValueError("no choice block")
    parts = _ARC_CHOICE.split(rest)  # ['', '1', 'text', '2', 'text', ...]
    numbers, texts = parts[1::2], parts[2::2]
    if parts[0] != "" or numbers != [str(i + 1) for i in range(len(numbers))]:
        raise ValueError("choices not numbered 1..n")
    return question, texts


def arc_docs(data_dir: Path, task: str) -> list[dict]:
    """allenai/ai2_arc schema: id, question, choices {text, label}, answerKey.

    Questions and choice texts come from LLM-Adapters' instruction format; ids and answer keys from AI2's own key
    file (same order). The original choice labels were lost; we rebuild them in the key's style (A.. or 1..), which
    is all the built-in task uses them for (``choices.label.index(answerKey)``). Every row is cross-checked: the
    adapters' 'answerK' must be the key's position.
    """
    inst_path, key_path = require_files(task, data_dir)
    rows, keys = _json(inst_path), _jsonl(key_path)
    if len(rows) != len(keys):
        raise JointRankError(f"{task}: {len(rows)} questions but {len(keys)} answer keys")
    docs = []
    for i, (row, key) in enumerate(zip(rows, keys)):
        try:
            question, texts = _parse_arc_instruction(row["instruction"])
        except ValueError as exc:
            raise JointRankError(f"{task}: row {i} of {inst_path.name} does not parse ({exc})") from exc
        answer_key = key["answerKey"]
        labels = [str(j + 1) for j in range(len(texts))] if answer_key.isdigit() else "ABCDE"[: len(texts)]
        if answer_key not in labels or int(row["answer"].removeprefix("answer")) != list(labels).index(answer_key) + 1:
            raise JointRankError(f"{task}: row {i} ({key['id']}): LLM-Adapters answer {row['answer']} disagrees with AI2 key {answer_key}")
        docs.append({"id": key["id"], "question": question, "choices": {"text": texts, "label": list(labels)}, "answerKey": answer_key})
    return _check_rows(task, docs)


def openbookqa_docs(data_dir: Path) -> list[dict]:
    """allenai/openbookqa (main) schema: id, question_stem, choices {text, label}, answerKey. Original format."""
    path, key_path = require_files("openbookqa", data_dir)
    rows, keys = _jsonl(path), {k["id"]: k["answerKey"] for k in _jsonl(key_path)}
    docs = []
    for row in rows:
        if keys.get(row["id"]) != row["answerKey"]:
            raise JointRankError(f"openbookqa: {row['id']}: answer key disagrees with AI2's key file")
        choices = row["question"]["choices"]
        docs.append({
            "id": row["id"],
            "question_stem": row["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": row["answerKey"],
        })
    return _check_rows("openbookqa", docs)


_BOOLQ = re.compile(r"\APassage: (?P<passage>.*)\nQuestion: (?P<question>.*)\?\Z", re.S)


def boolq_docs(data_dir: Path) -> list[dict]:
    """super_glue/boolq schema: passage, question (no '?'), label (0 = no/False, 1 = yes/True), idx.

    llm-foundry's query is 'Passage: {passage}\\nQuestion: {question}?'; the greedy passage group takes the *last*
    '\\nQuestion: ' (one passage itself contains that string)."""
    (path,) = require_files("boolq", data_dir)
    docs = []
    for i, row in enumerate(_jsonl(path)):
        m = _BOOLQ.match(row["query"])
        if not m or row["choices"] != ["no", "yes"]:
            raise JointRankError(f"boolq: row {i} of {path.name} is not in llm-foundry's Passage/Question format")
        docs.append({"passage": m["passage"], "question": m["question"], "label": int(row["gold"]), "idx": i})
    return _check_rows("boolq", docs)


_WINO = re.compile(
    r"\APlease choose the correct answer to fill in the blank to complete the given sentence: (?P<sentence>.*)"
    r"\n\nOption1: (?P<option1>.*) Option2: (?P<option2>.*) Answer format: option1/option2\Z",
    re.S,
)


def winogrande_docs(data_dir: Path) -> list[dict]:
    """allenai/winogrande schema: sentence (with '_'), option1, option2, answer ('1'/'2').

    Rebuilt from LLM-Adapters' copy, then checked against llm-foundry's independent copy row by row: the partial
    contexts (sentence up to '_' with each option filled in), the continuation and the gold answer must all match
    what lm-eval's winogrande preprocessing produces from the rebuilt fields."""
    adapters_path, foundry_path = require_files("winogrande", data_dir)
    rows, foundry = _json(adapters_path), _jsonl(foundry_path)
    if len(rows) != len(foundry):
        raise JointRankError(f"winogrande: the two copies differ in length ({len(rows)} vs {len(foundry)})")
    docs = []
    for i, (row, ref) in enumerate(zip(rows, foundry)):
        m = _WINO.match(row["instruction"])
        if not m:
            raise JointRankError(f"winogrande: row {i} of {adapters_path.name} does not parse")
        doc = {"sentence": m["sentence"], "option1": m["option1"], "option2": m["option2"], "answer": row["answer"][-1]}
        cut = doc["sentence"].index("_")
        contexts = [doc["sentence"][:cut] + doc["option1"], doc["sentence"][:cut] + doc["option2"]]
        continuation = doc["sentence"][cut + 1:].strip()
        if contexts != ref["context_options"] or continuation != ref["continuation"] or int(doc["answer"]) - 1 != ref["gold"]:
            raise JointRankError(f"winogrande: row {i}: LLM-Adapters and llm-foundry copies disagree")
        docs.append(doc)
    return _check_rows("winogrande", docs)


def lambada_docs(data_dir: Path) -> list[dict]:
    """EleutherAI/lambada_openai schema: text. llm-foundry split each passage at its last space; joining with one
    space restores it, and we check that the built-in task's ``text.split(' ')`` split gives back the same pair."""
    (path,) = require_files("lambada_openai", data_dir)
    docs = []
    for i, row in enumerate(_jsonl(path)):
        text = row["context"] + " " + row["continuation"]
        words = text.split(" ")
        if " ".join(words[:-1]) != row["context"] or words[-1] != row["continuation"]:
            raise JointRankError(f"lambada_openai: row {i}: context/continuation do not split at the last space")
        docs.append({"text": text})
    return _check_rows("lambada_openai", docs)


_SENTENCE_END = re.compile(r"[.!?] ")


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """Recover (ctx_a, ctx_b) from the joined ``ctx`` of klosax's file. Approximation, see hellaswag_docs."""
    ends = list(_SENTENCE_END.finditer(ctx))
    start = ends[-1].end() if ends else 0
    tail = ctx[start:]
    if tail[:1].islower():  # ActivityNet-style: ctx_b is the lower-case fragment after the last full sentence
        return ctx[:start].rstrip(" "), tail
    return ctx, ""


def hellaswag_docs(data_dir: Path) -> list[dict]:
    """Rowan/hellaswag schema: activity_label, ctx_a, ctx_b, ctx, endings, label (str), for lm-eval's process_docs.

    klosax's file holds 'activity_label: ctx' (ctx = ctx_a + ' ' + ctx_b), the gold label and four endings, already
    through lm-eval's ``preprocess`` (brackets and [title] gone). It lost one thing: lm-eval capitalises ctx_b
    (``ctx_b.capitalize()``) before joining, and the file does not say where ctx_b starts. We take ctx_b to be the
    lower-case fragment after the last sentence end (how ActivityNet contexts are built: 'A man is sitting on a
    roof. he'), else empty. This is the one known approximation among the local sets: a ctx_b that starts with a
    capital, or has capitals later (capitalize() lower-cases them), is not reproduced. ``preprocess`` is idempotent
    on text it has already cleaned, so running process_docs again is harmless.
    """
    (path,) = require_files("hellaswag", data_dir)
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise JointRankError(f"hellaswag: {len(lines)} lines in {path.name}, not a multiple of 6")
    docs = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1], lines[i + 2: i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise JointRankError(f"hellaswag: task {i // 6} in {path.name} is malformed")
        ctx_a, ctx_b = split_hellaswag_context(ctx)
        docs.append({"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx, "endings": endings, "label": label})
    return _check_rows("hellaswag", docs)


LOADERS = {
    "piqa": piqa_docs,
    "hellaswag": hellaswag_docs,
    "winogrande": winogrande_docs,
    "boolq": boolq_docs,
    "openbookqa": openbookqa_docs,
    "arc_easy": lambda d: arc_docs(d, "arc_easy"),
    "arc_challenge": lambda d: arc_docs(d, "arc_challenge"),
    "lambada_openai": lambada_docs,
}


def load_docs(task: str, data_dir: Path) -> list[dict]:
    return LOADERS[task](data_dir)
