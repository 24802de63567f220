"""The competition loop as a user chains the tools: convert, train, score, TTA, probability
dumps, ensemble + post-processing, pseudo-labels, retrain; each tool runs as a subprocess.

``steps`` runs resumable subprocess steps with progress; ``competition`` builds the loop's steps
for a label-map data root; ``report`` turns the scores into a markdown table and a JSON.
"""

from .competition import LoopSettings, build_loop, run_loop
from .report import collect_rows, format_table
from .steps import Step, StepFailed, StepRunner

__all__ = [
    "LoopSettings",
    "Step",
    "StepFailed",
    "StepRunner",
    "build_loop",
    "collect_rows",
    "format_table",
    "run_loop",
]
