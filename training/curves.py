"""Training curves of one or more runs, drawn from their log.jsonl.

    python -m training.curves runs/tmaze/rate                           # writes runs/tmaze/rate/curves.png
    python -m training.curves runs/memory_maze/a runs/memory_maze/b --out ab.png   # runs side by side

Panels: the training loss per optimiser step (faint) with its moving average, the held-out loss after
each epoch (train --val-data), the in-run evaluation after each epoch (train --eval-every) and the
learning rate. A panel with nothing to show in any run is left out. train writes the same figure to
its run folder after every epoch.

A resumed run appends to its log after the last whole epoch; the lines of the interrupted epoch are
superseded by the resumed ones, so each step and epoch is drawn once, as the run that finished it logged it.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

from training.cli import OWN_DEFAULT, cli, run_main
from training.figures import metric_label, plt, png_out_or_exit, save_png


@dataclass
class RunLog:
    """What a run's log.jsonl holds, one entry per step and per epoch (the latest where a resume repeated one)."""

    name: str
    steps: np.ndarray  # (S,) optimiser step after each logged batch
    losses: np.ndarray  # (S,) training loss of that batch
    learning_rates: np.ndarray  # (S,)
    epoch_steps: np.ndarray  # (E,) optimiser step at the end of each finished epoch
    val_losses: np.ndarray  # (E,) held-out loss after that epoch, nan where none was measured
    evaluations: dict[str, np.ndarray] = field(default_factory=dict)  # setting value -> (E,) score, nan where none
    epoch_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (E,)
    stopped: bool = False  # the last sitting stopped at --max-minutes


def read_log(run: Path) -> RunLog:
    """Read run/log.jsonl (or a log.jsonl path). Raises FileNotFoundError / ValueError with what to do."""
    run = Path(run)
    path = run if run.name.endswith(".jsonl") else run / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run folder written by python -m training.train "
                                "(its --out)")
    batches, epochs, stopped, last_step = {}, {}, False, -1
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a last line cut by a kill
            raise ValueError(f"{path}:{number} is not JSON; is this a training log?") from None
        if not isinstance(record, dict) or "step" not in record or "epoch" not in record:
            raise ValueError(f"{path}:{number} is not a training log line (it has no step and epoch)")
        if "stopped" in record:
            stopped = True  # at its step: later lines are a killed sitting's, which a resumed one did not redo
            batches = {s: r for s, r in batches.items() if s <= record["step"]}
            epochs = {e: r for e, r in epochs.items() if r["step"] <= record["step"]}
            last_step = min(last_step, record["step"])
        elif "loss" in record:
            step = record["step"]
            if step <= last_step:  # a resumed sitting redoes these steps (and their epochs)
                batches = {s: r for s, r in batches.items() if s < step}
                epochs = {e: r for e, r in epochs.items() if r["step"] < step}
            batches[step], last_step = record, step
            stopped = False
        else:
            epochs[record["epoch"]] = record
    if not batches and not epochs:
        raise ValueError(f"{path} holds no training steps yet")
    steps = sorted(batches)
    epoch_numbers = sorted(epochs)
    values = in_setting_order({value for e in epochs.values() for value in e.get("eval", {})})
    return RunLog(
        name=str(run.parent if run.name.endswith(".jsonl") else run),
        steps=np.array(steps, dtype=np.int64),
        losses=np.array([batches[s]["loss"] for s in steps], dtype=np.float64),
        learning_rates=np.array([batches[s].get("lr", math.nan) for s in steps], dtype=np.float64),
        epoch_steps=np.array([epochs[e]["step"] for e in epoch_numbers], dtype=np.int64),
        val_losses=np.array([epochs[e].get("val_loss", math.nan) for e in epoch_numbers], dtype=np.float64),
        evaluations={v: np.array([epochs[e].get("eval", {}).get(v, math.nan) for e in epoch_numbers],
                                 dtype=np.float64) for v in values},
        epoch_seconds=np.array([epochs[e].get("epoch_seconds", math.nan) for e in epoch_numbers], dtype=np.float64),
        stopped=stopped,
    )


def in_setting_order(values) -> list[str]:
    """Setting values as logged (strings of integers, e.g. "150", "1200") in numeric order."""
    return sorted(values, key=lambda v: (len(v), v))


def smoothing_window(steps: int) -> int:
    """Steps in the moving average of a run of `steps` logged steps: about 2% of them."""
    return max(1, steps // 50)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """(S,) -> (S,) mean of the last `window` values (fewer at the start); nan values are skipped."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    start = np.maximum(np.arange(len(values)) - window, -1)
    window_sums = sums - np.where(start >= 0, sums[np.maximum(start, 0)], 0.0)
    window_counts = counts - np.where(start >= 0, counts[np.maximum(start, 0)], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return window_sums / window_counts


def plot_runs(logs: list[RunLog], metric: str = "score"):
    """A matplotlib figure of the runs' curves (one colour per run). metric names the evaluation's axis."""
    panels = ["loss"]
    if any(np.isfinite(log.val_losses).any() for log in logs):
        panels.append("val")
    if any(log.evaluations for log in logs):
        panels.append("eval")
    panels.append("lr")
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False)
    axes = dict(zip(panels, axes[:, 0], strict=True))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    values = in_setting_order({value for log in logs for value in log.evaluations})
    styles = {value: ["-", "--", ":", "-."][i % 4] for i, value in enumerate(values)}  # one per setting value
    labelled = set()
    window = smoothing_window(max(len(log.steps) for log in logs))  # one smoothing for every run
    for index, log in enumerate(logs):
        colour = colours[index % len(colours)]
        label = log.name + (" (stopped at --max-minutes)" if log.stopped else "")
        if len(log.steps):
            axes["loss"].plot(log.steps, log.losses, color=colour, alpha=0.2, linewidth=0.8)
            axes["loss"].plot(log.steps, moving_average(log.losses, window), color=colour, linewidth=1.6,
                              label=label)
            axes["lr"].plot(log.steps, log.learning_rates, color=colour, linewidth=1.4)
        if "val" in axes and np.isfinite(log.val_losses).any():
            axes["val"].plot(log.epoch_steps, log.val_losses, color=colour, marker="o", markersize=3.5)
        for value, scores in log.evaluations.items():
            shown = np.isfinite(scores)
            axes["eval"].plot(log.epoch_steps[shown], scores[shown], color=colour, linestyle=styles[value], marker="o",
                              markersize=3.5, label=None if value in labelled else value)
            labelled.add(value)
    axes["loss"].set_ylabel("training loss")
    axes["loss"].set_title(f"moving average over {window} steps; raw steps faint" if window > 1 else "per step",
                           fontsize=9, color="0.35")
    axes["loss"].legend(fontsize=8, loc="upper right")
    if "val" in axes:
        axes["val"].set_ylabel("held-out loss")
    if "eval" in axes:
        axes["eval"].set_ylabel(metric)
        if metric == "success rate":
            axes["eval"].set_ylim(-0.03, 1.03)
        axes["eval"].legend(fontsize=8, title="setting", title_fontsize=8, loc="lower right")
    axes["lr"].set_ylabel("learning rate")
    axes["lr"].set_xlabel("optimiser step")
    for axis in axes.values():
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def write_curves(logs: list[RunLog], out: Path, metric: str = "score") -> Path:
    """Draw the runs into out (a PNG, written whole or not at all)."""
    return save_png(plot_runs(logs, metric), out)


def summary(log: RunLog) -> str:
    """One line: steps, epochs, last smoothed loss, best held-out loss and best evaluation with their epochs."""
    parts = [f"{log.name}: {len(log.epoch_steps)} epochs, {int(log.steps[-1]) if len(log.steps) else 0} steps"]
    if len(log.losses):
        parts.append(f"training loss {moving_average(log.losses, smoothing_window(len(log.steps)))[-1]:.4f} at the end")
    if np.isfinite(log.val_losses).any():
        best = int(np.nanargmin(log.val_losses))
        parts.append(f"best held-out loss {log.val_losses[best]:.4f} after epoch {best + 1}")
    for value, scores in log.evaluations.items():
        if np.isfinite(scores).any():
            best = int(np.nanargmax(scores))
            parts.append(f"best evaluation at {value}: {scores[best]:.3g} after epoch {best + 1}")
    if log.stopped:
        parts.append("stopped at --max-minutes")
    return "; ".join(parts)


@dataclass
class Args:
    """Plot the training curves of one or more runs (their log.jsonl) into one PNG."""

    runs: Annotated[tyro.conf.Positional[tuple[Path, ...]], OWN_DEFAULT]
    """run folders written by python -m training.train (its --out), or their log.jsonl files"""
    out: Annotated[Path | None, OWN_DEFAULT] = None
    """the PNG to write (default: curves.png in the first run's folder)"""


def main(args: Args) -> None:
    if not args.runs:
        raise SystemExit("error: give at least one run folder, e.g. python -m training.curves runs/tmaze/rate")
    try:
        logs = [read_log(run) for run in args.runs]
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    out = args.out or Path(logs[0].name) / "curves.png"
    png_out_or_exit("--out", out)
    for log in logs:
        print(summary(log))
    print(f"wrote {write_curves(logs, out, metric_label(_task_of(Path(logs[0].name))))}")


def _task_of(run: Path) -> str | None:
    """The task named by a run's checkpoint (last/ or model/ config.json), None if it has none yet."""
    from rate_core.checkpoint import CheckpointError, read_checkpoint_config

    for folder in (run / "model", run / "last"):
        try:
            return read_checkpoint_config(folder).get("task")
        except CheckpointError:
            continue
    return None


if __name__ == "__main__":
    run_main(main, cli(Args))
