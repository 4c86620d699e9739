"""What /proc says about a process and the machine: resident memory and CPU time."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 when the process is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the command name in parentheses; utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s threads, grouped: "main" (the event loop's thread), the
    other Python threads (database driver threads such as aiosqlite's) as "python", and
    gRPC core's threads by their names."""
    groups: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return groups
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        group = "main" if int(tid) == pid else (name or "?")
        groups[group] = groups.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return groups


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@dataclass
class CpuUsage:
    """CPU used over a window: per watched process as a fraction of one core, and the
    whole machine's busy fraction of all its cores."""

    seconds: float
    per_pid: dict[int, float]
    machine_busy: float
    # The first watched process's threads (the server), as fractions of one core.
    server_threads: dict[str, float]

    def cores(self, pids: Sequence[int]) -> float:
        return sum(self.per_pid.get(pid, 0.0) for pid in pids)

    def threads(self) -> str:
        """The server's CPU by thread group, e.g. "main 61%, python 20%"."""
        busiest = sorted(self.server_threads.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {100 * share:.0f}%" for name, share in busiest if share >= 0.005)

    def others(self, pids: Sequence[int]) -> float:
        """Cores busy outside ``pids``: the kernel, PostgreSQL, anything else running."""
        return max(0.0, self.machine_busy * CPUS - self.cores(pids))


class CpuWindow:
    """Reads CPU time of some processes and of the machine at start and at stop."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._t0 = time.monotonic()
        self._cpu0 = {pid: cpu_seconds(pid) for pid in self.pids}
        self._threads0 = thread_cpu_seconds(self.pids[0]) if self.pids else {}
        self._machine0 = machine_ticks()

    def stop(self) -> CpuUsage:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        busy1, total1 = machine_ticks()
        busy0, total0 = self._machine0
        per_pid = {pid: (cpu_seconds(pid) - self._cpu0[pid]) / elapsed for pid in self.pids}
        machine = (busy1 - busy0) / max(total1 - total0, 1)
        threads1 = thread_cpu_seconds(self.pids[0]) if self.pids else {}
        threads = {
            name: (seconds - self._threads0.get(name, 0.0)) / elapsed
            for name, seconds in threads1.items()
        }
        return CpuUsage(elapsed, per_pid, machine, threads)
