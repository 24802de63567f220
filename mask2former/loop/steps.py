"""Resumable subprocess steps: a step is complete when all its final artefacts exist (the tools
write them atomically), so an interrupted loop reruns only the incomplete steps."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from ..utils.io import write_json

logger = logging.getLogger(__name__)

STATE_NAME = "steps.json"


@dataclass
class Step:
    """One tool invocation.

    Attributes:
        name: unique step name (also the log file name).
        command: argv; ``"python"`` as first element means this interpreter.
        artefacts: files that exist only once the step is complete.
        outputs: files / folders the step writes; removed before a rerun so that a half-written
            result of an interrupted run is never mixed with the new one.
        cost: expected duration in rough seconds (e.g. 30 + training iterations), for the ETA:
            the remaining cost is scaled by the measured time per unit of cost so far.
    """

    name: str
    command: List[str]
    artefacts: List[str]
    outputs: List[str] = field(default_factory=list)
    cost: float = 1.0

    def complete(self) -> bool:
        return all(os.path.exists(path) for path in self.artefacts)


class StepFailed(RuntimeError):
    """A step's command exited with an error or did not write its artefacts."""


def _tail(path: str, lines: int = 30) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StepRunner:
    """Runs steps in order, reusing complete ones; logs one line per step with elapsed time and
    ETA; keeps each step's wall time in ``<work_dir>/steps.json`` (written atomically)."""

    def __init__(self, work_dir: str, cwd: str, env: Dict[str, str] = None):
        """
        Args:
            work_dir: where ``steps.json`` and ``logs/<step>.log`` go.
            cwd: working directory of the commands (the repository root).
            env: extra environment variables of the commands.
        """
        self.work_dir = work_dir
        self.cwd = cwd
        self.env = dict(os.environ, **(env or {}))
        self.log_dir = os.path.join(work_dir, "logs")
        self.state_path = os.path.join(work_dir, STATE_NAME)
        self.wall_times: Dict[str, float] = {}
        if os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as f:
                self.wall_times = json.load(f).get("wall_s", {})

    def _save(self) -> None:
        write_json(self.state_path, {"wall_s": self.wall_times}, indent=1)

    def _execute(self, step: Step) -> float:
        for path in step.outputs:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"{step.name}.log")
        argv = [
            sys.executable if a == "python" and i == 0 else a for i, a in enumerate(step.command)
        ]
        start = time.monotonic()
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(" ".join(argv) + "\n")
            log.flush()
            rc = subprocess.call(argv, cwd=self.cwd, env=self.env, stdout=log, stderr=log)
        wall = time.monotonic() - start
        if rc != 0:
            raise StepFailed(
                f"step {step.name!r} failed (exit {rc}); log {log_path}, last lines:\n"
                f"{_tail(log_path)}"
            )
        missing = [p for p in step.artefacts if not os.path.exists(p)]
        if missing:
            raise StepFailed(
                f"step {step.name!r} exited 0 but did not write {missing}; log {log_path}"
            )
        return wall

    def run(self, steps: Sequence[Step]) -> Dict[str, float]:
        """Run ``steps`` in order; returns the wall time of each (reused steps: as recorded)."""
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique: {names}")
        start = time.monotonic()
        todo_cost = sum(s.cost for s in steps if not s.complete())
        done_cost = 0.0
        for index, step in enumerate(steps, 1):
            prefix = f"[{index}/{len(steps)}] {step.name}"
            if step.complete():
                logger.info("%s: complete, reused", prefix)
                continue
            logger.info("%s: running", prefix)
            wall = self._execute(step)
            self.wall_times[step.name] = round(wall, 1)
            self._save()
            done_cost += step.cost
            elapsed = time.monotonic() - start
            eta = elapsed / done_cost * (todo_cost - done_cost) if done_cost else 0.0
            logger.info(
                "%s: done in %s; elapsed %s, ETA %s",
                prefix,
                _format_seconds(wall),
                _format_seconds(elapsed),
                _format_seconds(eta),
            )
        return {name: self.wall_times.get(name) for name in names}
