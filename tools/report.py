"""What the tools share and the lessons do not: wall-clock timing and markdown tables of results."""
from __future__ import annotations

import time

import torch

import common


def timed(device: torch.device, fn):
    """-> (fn(), wall seconds), waiting for the GPU before reading the clock each time."""
    common.sync(device)
    t0 = time.perf_counter()
    out = fn()
    common.sync(device)
    return out, time.perf_counter() - t0


def markdown_table(header: list[str], rows: list[list], float_format: str = ".3f") -> str:
    """Rows as a markdown table; floats formatted with `float_format` (3 decimals by default)."""
    def cell(v):
        return format(v, float_format) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def write_table(path: str, header: list[str], rows: list[list]) -> str:
    """Write rows as a markdown table (floats with 3 decimals) to `path` and return its text."""
    text = markdown_table(header, rows)
    with open(path, "w") as f:
        f.write(text + "\n")
    return text
