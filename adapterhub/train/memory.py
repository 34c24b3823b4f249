"""A process's own peak memory, as training runs and the training benchmark report it.

Design decisions:
- On Linux the peak is `VmHWM` from /proc/self/status, which the kernel resets when a process
  execs. `getrusage(...).ru_maxrss` is not: a child keeps its parent's peak across fork + exec,
  so a run started from a 2 GB process (pytest, a benchmark driver, a tuning loop) reported at
  least 2 GB whatever it used itself. Elsewhere (macOS: no /proc) ru_maxrss is what there is.
- Standard library only, so a benchmark's child process can measure itself without paying for
  torch's import in this module.
"""

from __future__ import annotations

import resource
import sys

_STATUS = "/proc/self/status"


def peak_resident_bytes() -> int:
    """This process's own peak resident set size, in bytes (see the module docstring)."""
    try:
        with open(_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, kB on Linux
