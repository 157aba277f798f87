"""Figures of the command-line tools: matplotlib without a display, PNGs written whole or not at all."""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_png(figure, out: Path) -> Path:
    """Write figure to out as a PNG through a temporary file renamed into place (a kill leaves the old
    file or none, never half of one), and close it. Raises ValueError if out does not end in .png."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out} must be a .png file")
    partial = out.with_name(f".{out.name}.partial")
    try:
        figure.savefig(partial, dpi=110, format="png")
        os.replace(partial, out)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)
    return out
