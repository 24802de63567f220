"""What to do with each problem (:class:`ValidationPolicy`) and what was found in one json
(:class:`ValidationReport`)."""

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, fields
from typing import Dict, List

from tabulate import tabulate

from .problems import PROBLEMS

__all__ = ["ValidationPolicy", "ValidationReport"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationPolicy:
    """What to do with each problem: ``"fix"``, ``"skip"`` or ``"error"`` (see :data:`PROBLEMS`
    for the policies each one accepts). Field names are the lower-case ``DATASETS.VALIDATION``
    keys."""

    duplicate_annotation_id: str = "fix"
    duplicate_image_id: str = "error"
    duplicate_file_name: str = "fix"
    orphan_annotation: str = "skip"
    degenerate_polygon: str = "skip"
    out_of_bounds: str = "fix"
    zero_area: str = "skip"
    unknown_category: str = "error"
    missing_image: str = "error"
    size_mismatch: str = "error"
    exif_rotation: str = "fix"
    # Open every image file (headers only: size, mode, EXIF orientation).
    check_files: bool = True
    # Also decode every image fully to find truncated / corrupt files (slow).
    verify_images: bool = False

    def __post_init__(self):
        for problem in PROBLEMS.values():
            if problem.policy is None:
                continue
            value = getattr(self, problem.policy)
            allowed = tuple(problem.actions) + ("error",)
            if value not in allowed:
                raise ValueError(
                    f"DATASETS.VALIDATION.{problem.policy.upper()} must be one of {allowed}, "
                    f"got {value!r}"
                )

    @classmethod
    def from_cfg(cls, node):
        """Build from ``cfg.DATASETS.VALIDATION`` (a CfgNode or a dict); missing keys keep their
        defaults."""
        if node is None:
            return cls()
        if isinstance(node, cls):
            return node
        values = {}
        for f in fields(cls):
            key = f.name.upper()
            if key in node:
                values[f.name] = node[key]
        return cls(**values)


class ValidationReport:
    """Counts and examples of the problems found in one json file."""

    def __init__(self, json_file, policy, max_examples=5):
        self.json_file = json_file
        self.policy = policy
        self.max_examples = max_examples
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[str]] = defaultdict(list)

    def add(self, kind, where, detail=""):
        """Record one occurrence of ``kind`` (a key of :data:`PROBLEMS`) at ``where`` (e.g.
        ``"batch_01/0002.jpg ann 17"``)."""
        if kind not in PROBLEMS:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(f"{where}: {detail}" if detail else str(where))

    def action(self, kind):
        """The policy applied to ``kind`` ("fix", "skip" or "error")."""
        problem = PROBLEMS[kind]
        if problem.policy is None:
            return "fix"
        return getattr(self.policy, problem.policy)

    def fatal_kinds(self):
        """Kinds found whose policy is "error"."""
        return [k for k in PROBLEMS if self.counts[k] and self.action(k) == "error"]

    def table(self, kinds=None):
        """The report as a text table (one row per problem found)."""
        rows = []
        for kind in kinds or [k for k in PROBLEMS if self.counts[k]]:
            action = self.action(kind)
            text = "ERROR" if action == "error" else f"{action}: {PROBLEMS[kind].actions[action]}"
            rows.append([kind, self.counts[kind], text, "\n".join(self.examples[kind])])
        if not rows:
            return "no problems found"
        return tabulate(rows, headers=["problem", "count", "action", "examples"], tablefmt="grid")

    def log(self, log=logger):
        if not any(self.counts.values()):
            log.info(f"Validated {self.json_file}: no problems found.")
            return
        log.warning(f"Problems found in {self.json_file}:\n{self.table()}")

    def raise_if_fatal(self):
        """Raise a ValueError listing every problem whose policy is "error"."""
        fatal = self.fatal_kinds()
        if fatal:
            lines = [
                f"{k} ({self.counts[k]}): {PROBLEMS[k].description} "
                f"[DATASETS.VALIDATION.{PROBLEMS[k].policy.upper()} = 'error']"
                for k in fatal
            ]
            raise ValueError(
                f"Invalid COCO json {self.json_file}:\n  "
                + "\n  ".join(lines)
                + "\n"
                + self.table(fatal)
            )

    def __str__(self):
        return f"ValidationReport({self.json_file}):\n{self.table()}"
