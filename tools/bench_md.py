"""Write one section of BENCHMARKS.md (a `## Heading` block), leaving the other sections as they are."""
from __future__ import annotations

import os
import platform
import re

import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def machine_line() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{device}, {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}"


def write_section(heading: str, body: str, path: str = BENCHMARKS) -> None:
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nEach section names the command that produced it.\n"
    block = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)
