"""Figures of the command-line tools: matplotlib without a display, PNGs written whole or not at all."""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rate_core.tasks import get_task, result_key  # noqa: E402
from training.cli import writable_file_or_exit  # noqa: E402


def metric_label(task_name: str | None) -> str:
    """The axis label of a task's evaluation metric ("success rate", "mean return"); "score" if the task is unknown."""
    try:
        return result_key(get_task(task_name).evaluation.metric).replace("_", " ")
    except (KeyError, TypeError, ValueError):
        return "score"


def png_out_or_exit(flag: str, out: Path) -> None:
    """SystemExit unless a PNG can be written at `out` (the value of option `flag`): a .png name, in a
    folder that exists and can be written; checked before the work that draws it (save_png writes it)."""
    if Path(out).suffix.lower() != ".png":
        raise SystemExit(f"error: {flag} {out} must be a .png file")
    writable_file_or_exit(flag, out)


def save_png(figure, out: Path, tight: bool = False) -> Path:
    """Write figure to out as a PNG through a temporary file renamed into place (a kill leaves the old
    file or none, never half of one), and close it. Raises ValueError if out does not end in .png.
    tight: the image takes in all the figure's text (equal-aspect panels can leave their labels outside)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out} must be a .png file")
    partial = out.with_name(f".{out.name}.partial")
    try:
        fit = {"bbox_inches": "tight", "pad_inches": 0.15} if tight else {}
        figure.savefig(partial, dpi=110, format="png", **fit)
        os.replace(partial, out)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    raise SystemExit("training.figures holds the plotting helpers of training.scores, training.curves and "
                     "training.compare; it has no command of its own: python -m training.scores --help")
