"""Resumable subprocess steps: a step is complete when all its final artefacts exist (the tools
write them atomically), so an interrupted loop reruns only the incomplete steps. Steps that do not
depend on each other can run side by side (``jobs``): a step waits for every earlier step whose
artefacts or outputs its command names."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from ..utils.io import write_json

logger = logging.getLogger(__name__)

STATE_NAME = "steps.json"
# how often a runner with several jobs looks at its running commands
POLL_SECONDS = 0.2


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


def _names_path(command: Sequence[str], path: str) -> bool:
    """Whether an argument of ``command`` is ``path``, lies under it, or quotes it (a path
    inside a config value such as ``[['name', 'PATH', ...]]``)."""
    pattern = re.compile(re.escape(path) + r"(?=$|[/\\'\",\])])")
    return any(pattern.search(arg) for arg in command)


def step_dependencies(steps: Sequence[Step]) -> Dict[str, List[str]]:
    """For each step, the earlier steps it waits for: those whose artefacts or outputs its
    command names."""
    needs = {}
    for index, step in enumerate(steps):
        needs[step.name] = [
            earlier.name
            for earlier in steps[:index]
            if any(_names_path(step.command, p) for p in earlier.artefacts + earlier.outputs)
        ]
    return needs


@dataclass
class _Running:
    """A started step: its process, open log file and start time."""

    step: Step
    process: subprocess.Popen
    log: object
    log_path: str
    start: float


class StepRunner:
    """Runs steps in order, reusing complete ones; logs one line per step with elapsed time and
    ETA; keeps each step's wall time in ``<work_dir>/steps.json`` (written atomically)."""

    def __init__(self, work_dir: str, cwd: str, env: Dict[str, str] = None, jobs: int = 1):
        """
        Args:
            work_dir: where ``steps.json`` and ``logs/<step>.log`` go.
            cwd: working directory of the commands (the repository root).
            env: extra environment variables of the commands.
            jobs: steps run side by side at most. With more than one, each command gets
                ``OMP_NUM_THREADS`` = CPU cores // jobs (at least 1) unless ``env`` or the
                environment sets it.
        """
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.work_dir = work_dir
        self.cwd = cwd
        self.jobs = jobs
        self.env = dict(os.environ, **(env or {}))
        if jobs > 1 and "OMP_NUM_THREADS" not in self.env:
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        self.log_dir = os.path.join(work_dir, "logs")
        self.state_path = os.path.join(work_dir, STATE_NAME)
        self.wall_times: Dict[str, float] = {}
        if os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as f:
                self.wall_times = json.load(f).get("wall_s", {})

    def _save(self) -> None:
        write_json(self.state_path, {"wall_s": self.wall_times}, indent=1)

    def _start(self, step: Step) -> _Running:
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
        log = open(log_path, "w", encoding="utf-8")
        log.write(" ".join(argv) + "\n")
        log.flush()
        process = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=log, stderr=log)
        return _Running(step, process, log, log_path, time.monotonic())

    @staticmethod
    def _finish(running: _Running) -> float:
        """Wall time of a step whose process has ended; StepFailed if it failed."""
        rc = running.process.wait()
        wall = time.monotonic() - running.start
        running.log.close()
        step, log_path = running.step, running.log_path
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

    def _eta(self, seconds_per_cost: float, pending, running) -> float:
        """Seconds left: the cost of the pending steps and the unfinished part of the running
        ones, at the time per unit of cost of the steps finished so far, over ``jobs``."""
        now = time.monotonic()
        left = sum(s.cost for s in pending) * seconds_per_cost
        left += sum(max(0.0, r.step.cost * seconds_per_cost - (now - r.start)) for r in running)
        return left / self.jobs

    def run(self, steps: Sequence[Step]) -> Dict[str, float]:
        """Run ``steps`` (in order, or side by side up to ``jobs`` where they do not depend on
        each other); returns the wall time of each (reused steps: as recorded). A failed step
        is reported at once; the steps still running are waited for, then StepFailed is
        raised."""
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique: {names}")
        needs = step_dependencies(steps)
        index_of = {s.name: i for i, s in enumerate(steps, 1)}
        prefix = {s.name: f"[{index_of[s.name]}/{len(steps)}] {s.name}" for s in steps}
        start = time.monotonic()
        pending = []
        for step in steps:
            if step.complete():
                logger.info("%s: complete, reused", prefix[step.name])
            else:
                pending.append(step)
        done = {s.name for s in steps} - {s.name for s in pending}
        done_cost = done_wall = 0.0
        running: List[_Running] = []
        failure = None
        while pending or running:
            while failure is None and len(running) < self.jobs:
                ready = next((s for s in pending if set(needs[s.name]) <= done), None)
                if ready is None:
                    break
                pending.remove(ready)
                logger.info("%s: running", prefix[ready.name])
                running.append(self._start(ready))
            if failure is not None and not running:
                break
            ended = [r for r in running if r.process.poll() is not None]
            if not ended:
                if len(running) == 1 or self.jobs == 1:
                    running[0].process.wait()
                else:
                    time.sleep(POLL_SECONDS)
                continue
            for item in ended:
                running.remove(item)
                name = item.step.name
                try:
                    wall = self._finish(item)
                except StepFailed as error:
                    if failure is None:
                        failure = error
                    if running:
                        logger.error("%s; waiting for the running steps", error)
                    continue
                self.wall_times[name] = round(wall, 1)
                self._save()
                done.add(name)
                done_cost += item.step.cost
                done_wall += wall
                elapsed = time.monotonic() - start
                eta = self._eta(done_wall / done_cost, pending, running)
                logger.info(
                    "%s: done in %s; elapsed %s, ETA %s",
                    prefix[name],
                    _format_seconds(wall),
                    _format_seconds(elapsed),
                    _format_seconds(eta),
                )
        if failure is not None:
            raise failure
        return {name: self.wall_times.get(name) for name in names}
