"""The loop's table: one row per scored result (``lb_metrics.json`` of the LB evaluator)."""

import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["collect_rows", "format_table", "read_score"]


def read_score(path: str) -> Dict[str, float]:
    """The ``metrics`` of an ``lb_metrics.json``."""
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    try:
        return document["metrics"]
    except KeyError:
        raise ValueError(f"{path} has no 'metrics': not an lb_metrics.json") from None


def collect_rows(
    rows: Sequence[Tuple[str, str, str, Optional[str], List[str]]],
    wall_times: Dict[str, float],
    rare_classes: Sequence[str],
) -> List[Dict]:
    """Rows whose score exists, with mIoU, the rare classes' IoU, the delta against the row's
    reference and the wall time of the steps that produced it; then one summary row per Swin
    init (mean and spread over seeds) when the init ablation ran."""
    scores = {}
    result = []
    for group, name, score_path, reference, step_names in rows:
        if not os.path.exists(score_path):
            continue
        metrics = read_score(score_path)
        scores[name] = metrics
        row = {
            "group": group,
            "name": name,
            "mIoU": metrics["mIoU"],
            "IoU": {c: metrics.get(f"IoU-{c}") for c in rare_classes},
            "reference": reference,
            "delta": None,
            "wall_s": round(sum(wall_times.get(s) or 0.0 for s in step_names), 1),
            "score_file": score_path,
        }
        if reference in scores:
            row["delta"] = metrics["mIoU"] - scores[reference]["mIoU"]
        result.append(row)
    for init in ("official", "trunc_normal"):
        values = [r["mIoU"] for r in result if r["name"].startswith(f"abl_init_{init}_seed")]
        if values:
            result.append(
                {
                    "group": "ablations",
                    "name": f"init {init}: mean of {len(values)} seeds",
                    "mIoU": statistics.fmean(values),
                    "spread": max(values) - min(values),
                    "IoU": {},
                    "reference": None,
                    "delta": None,
                    "wall_s": None,
                }
            )
    return result


def _number(value, signed=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_table(document: Dict, rare_classes: Sequence[str]) -> str:
    """Markdown table of ``document["rows"]`` with the budget and the command above it."""
    budget = document["budget"]
    lines = [
        f"Command: `{document.get('command', '')}`",
        "",
        f"Budget: {budget['main_iters']} iterations per main model, "
        f"{budget['ablation_iters']} per ablation model; up to {document.get('jobs', 1)} "
        "steps side by side (wall s: each step's own time).",
        "",
        "| group | row | mIoU | " + " | ".join(rare_classes) + " | delta | wall s |",
        "|---" * (5 + len(rare_classes)) + "|",
    ]
    for row in document["rows"]:
        miou = _number(row["mIoU"])
        if "spread" in row:
            miou += f" (spread {row['spread']:.3f})"
        reference = f" vs {row['reference']}" if row["delta"] is not None else ""
        cells = [
            row["group"],
            row["name"],
            miou,
            *(_number(row["IoU"].get(c)) for c in rare_classes),
            _number(row["delta"], signed=True) + reference,
            "-" if row["wall_s"] is None else f"{row['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
