"""Provenance: what ran, where, and how; one function for runs, codec evaluation and training.

``provenance()`` returns a JSON-ready dict. The git commit is read once per process (at
the first call, or at :func:`pin_git_state`), so a long run names the code it loaded, not a
commit made while it was running. torch is imported only when a device is asked about.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "clbench",
    "torch",
    "torchvision",
    "avalanche-lib",
    "timm",
    "peft",
    "compressai",
    "numpy",
)
# CPU features that decide speed and precision choices (bf16 autocast is fast only with
# AVX512-BF16 or AMX); the full flag list is long and says little more.
CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
)

_GIT_AT_START: dict[str, Any] = {}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def pin_git_state() -> dict[str, Any]:
    """The commit and dirtiness of the code this process loaded, read once and cached.

    Call it at the start of a long command so that its records name the code that ran.
    ``git_dirty`` ignores untracked files (results written by the run itself).
    """
    if not _GIT_AT_START:
        status = _git("status", "--porcelain", "--untracked-files=no")
        _GIT_AT_START.update(
            git_commit=_git("rev-parse", "HEAD"),
            git_dirty=None if status is None else bool(status),
        )
    return dict(_GIT_AT_START)


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for p in packages:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return versions


def cpu_info() -> dict[str, Any]:
    """CPU model, logical cores, the flags in :data:`CPU_FLAGS` it has, and torch's SIMD level."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the model from platform is what there is
        pass
    info: dict[str, Any] = {
        "model": model or "unknown",
        "logical_cores": os.cpu_count(),
        "flags": [f for f in CPU_FLAGS if f in flags],
    }
    if "torch" in sys.modules:  # only when already loaded: this must not import torch
        torch = sys.modules["torch"]
        get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
        info["torch_capability"] = get() if callable(get) else None
    return info


def command_line(argv: list[str] | None = None) -> str:
    """The command as a shell would take it back: program name (not its path) and arguments."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return ""
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(
    device: Any = None,
    command: str | None = None,
    *,
    packages: Iterable[str] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """What ran, where and how, for a record or a report.

    Args:
        device: a ``torch.device`` or its string (default ``"cpu"``).
        command: the command line (default: this process's, see :func:`command_line`).
        packages: distributions to report beyond :data:`PACKAGES` (e.g. pillow for codecs).
        threads: the intra-op thread count (default: ``torch.get_num_threads()`` if torch is
            loaded, else ``os.cpu_count()``).

    Returns:
        ``clbench_version, git_commit, git_dirty, packages, device, cpu, threads,
        command, hostname, python, platform``; runs add ``started_at``/``finished_at``.
    """
    versions = package_versions(dict.fromkeys([*PACKAGES, *packages]))
    dev = str(device) if device is not None else "cpu"
    cpu = cpu_info()
    torch = sys.modules.get("torch")
    if dev.startswith("cuda") and torch is not None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(dev))
    else:
        device_name = cpu["model"]
    if threads is None:
        threads = torch.get_num_threads() if torch is not None else (os.cpu_count() or 1)
    return {
        "clbench_version": versions["clbench"],
        **pin_git_state(),
        "packages": versions,
        "device": device_name,
        "device_type": dev,
        "cpu": cpu,
        "threads": int(threads),
        "command": command_line() if command is None else command,
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
