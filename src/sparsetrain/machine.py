"""Where a measurement ran: the CPU model and a one-line description, for results files."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()}, {os.cpu_count()} cores{gpu}; Python {sys.version.split()[0]}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")
