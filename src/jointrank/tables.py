"""Plain-text and Markdown tables, and the summaries every command prints."""

from __future__ import annotations

from collections import defaultdict


def format_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in out)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%x"))
        return True
    except ValueError:
        return text == ""


def layer_ranges(layers: list[int]) -> str:
    """[0,1,2,5,6] -> '0-2,5-6'."""
    if not layers:
        return "-"
    layers = sorted(layers)
    parts, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def unit_labels(entry: dict) -> tuple[list[int], str, str]:
    """How a plan entry (as a dict) is named in a table: the layers it serves, its member kinds (once each: a
    cross-layer unit repeats them per layer) and its structure (saying so when a basis spans layers)."""
    from .format import structure_of
    from .plan import span_of

    span = span_of(entry["members"])
    who = "+".join(dict.fromkeys(m.rsplit(".", 1)[1] for m in entry["members"]))
    structure = structure_of(entry) + (f" across {span} layers" if span > 1 else "")
    return list(range(entry["layer"], entry["layer"] + span)), who, structure


def plan_summary(entries: list[dict]) -> str:
    """One row per (group, member, structure, rank): which layers, parameters before and after, and the modelled
    per-token cost against dense (plan.unit_cost: multiply-adds, shared projection counted once)."""
    from .plan import unit_cost

    rows = defaultdict(lambda: {"layers": [], "before": 0, "after": 0, "notes": set(), "macs": [0, 0]})
    for e in entries:
        layers, who, structure = unit_labels(e)
        key = (e["group"], who, structure, e["rank"])
        rows[key]["layers"].extend(layers)
        rows[key]["before"] += e["params_before"]
        rows[key]["after"] += e["params_after"]
        if e["rank"] is not None:
            cost = unit_cost(e["d_outs"], e["d_in"], e["rank"], span=len(layers))
            rows[key]["macs"][0] += cost.factorised_macs
            rows[key]["macs"][1] += cost.dense_macs
        if e.get("note"):
            rows[key]["notes"].add(e["note"].split(":")[0])
    body = []
    for (group, who, structure, rank), r in rows.items():
        macs = f"{r['macs'][0] / r['macs'][1]:.2f}x" if r["macs"][1] else "-"
        body.append([group, who, structure, rank if rank is not None else "-", layer_ranges(r["layers"]),
                     r["before"], r["after"], macs, "; ".join(sorted(r["notes"]))])
    return format_table(["group", "members", "structure", "rank", "layers", "params before", "params after",
                         "MACs/token vs dense", "note"], body)


def params_summary(total_before: int, total_after: int, decoder_before: int, decoder_after: int) -> str:
    rows = []
    for name, before, after in (("whole model", total_before, total_after),
                                ("decoder layers", decoder_before, decoder_after)):
        rows.append([name, before, after, f"{after / before:.2%}", f"{1 - after / before:.2%}"])
    return format_table(["scope", "params before", "params after", "kept (after/before)", "removed"], rows)
