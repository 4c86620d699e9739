"""Optional sampling profiles of the server under test with py-spy (``--profile DIR``).

py-spy is not a dependency of the project:
``tools/.venv/bin/uv pip install --python .venv py-spy``. Profiles are collapsed stacks
(``--format raw``), one file per measured window, summarised here as the functions with
the most samples on top of the stack (self) and anywhere on it (total).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profile:
    """py-spy recording one process for a fixed number of seconds."""

    def __init__(
        self, pid: int, seconds: float, output: Path, mode: str = "all", rate: int = 100
    ) -> None:
        self.output = output
        executable = py_spy()
        self.process: subprocess.Popen[bytes] | None = None
        if executable is None:
            print("  (profile skipped: py-spy is not installed)")
            return
        self.process = subprocess.Popen(
            [
                executable, "record",
                "--pid", str(pid),
                "--duration", str(max(1, round(seconds))),
                "--rate", str(rate),
                "--format", "raw",
                *([] if mode == "native" else ["--nonblocking"]),
                "--output", str(output),
                *({"gil": ["--gil"], "native": ["--native"]}.get(mode, [])),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def finish(self, top: int = 12) -> str:
        if self.process is None:
            return ""
        try:
            _, stderr = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return "  (profile timed out)"
        if not self.output.exists():
            return f"  (profile failed: {stderr.decode(errors='replace').strip()[-300:]})"
        return summarise(self.output, top)


def _frame(frame: str) -> tuple[str, str]:
    """("function (module.py)", area) of a py-spy frame "function (path/module.py:123)"."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    file = path.rsplit("/", 1)[-1]
    return (f"{name} ({file})" if file else name), _area(path)


def _area(path: str) -> str:
    """What a source file belongs to: a project package, a library, or the stdlib module."""
    parts = path.split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    if parts[0] in ("services", "tessera"):
        return "/".join(parts[:2]) if parts[0] == "services" else "tessera"
    if parts[0] in ("google", "grpc_health", "grpc_reflection"):
        return "protobuf" if parts[0] == "google" else "grpc"
    if len(parts) > 1:
        return parts[0]
    return f"stdlib {parts[0].removesuffix('.py')}"


def summarise(path: Path, top: int = 12) -> str:
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        name, area = _frame(stack.split(";")[-1])  # the innermost frame is last
        samples += count
        own[name] += count
        areas[area] += count
    if samples == 0:
        return "  (profile empty)"
    lines = [f"  py-spy: {samples} samples in {path.name}; self time by area:"]
    lines += [f"    {100 * n / samples:5.1f}%  {name}" for name, n in areas.most_common(8)]
    lines.append("  most self time:")
    lines += [f"    {100 * n / samples:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)
