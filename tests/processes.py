"""Process helpers of the tests."""

import subprocess
import sys


def dead_pid() -> int:
    """The id of a process that has exited (what a killed run leaves in its temporaries' names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
