"""Scores of one or more evaluations of a task, drawn against the protocol's setting.

    python -m training.scores assets/checkpoints/tmaze/rate assets/checkpoints/tmaze/dt --out tmaze.png
    python -m training.scores rate.json dt.json            # eval.json files written by training.evaluate

One line per evaluation: the protocol's metric (success rate, or mean return) at each value of its
setting (T-Maze's corridor length, Minigrid's grid size) with the SEM as an error bar, on a log axis
where the values span a factor of 8 or more; where the protocol has a single value (ViZDoom's and
Memory Maze's step cap), one bar per evaluation. A grey band marks the setting values of the task's
datasets (T-Maze trained up to T = 150, Minigrid up to size 41). The table is printed too.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from rate_core.tasks import get_task
from training.cli import NONE_DEFAULT, OWN_DEFAULT, cli, run_main
from training.compare import distinct_labels, evaluated_folder, label_of, load_evaluation
from training.figures import metric_label, plt, png_out_or_exit, save_png


def metric_and_error(row: dict, metric: str) -> tuple[float, float]:
    """(value, SEM) of a result row: success rate with its binomial SEM, or mean return with return_sem."""
    if metric == "success":
        p, n = row["success_rate"], row["episodes"]
        return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan
    return row["mean_return"], row.get("return_sem", math.nan)


def plot_scores(reports: list[dict], labels: list[str] | None = None, references: dict[str, float] | None = None):
    """The figure of several evaluations of one task (ValueError if they are of different tasks); labels:
    one legend entry per evaluation (default: label_of); references: named levels drawn as dashed lines
    (e.g. {"paper RATE": 7.64})."""
    labels = labels or [label_of(report) for report in reports]
    tasks = {report["task"] for report in reports}
    if len(tasks) > 1:
        raise ValueError(f"the evaluations are of different tasks ({', '.join(sorted(tasks))}); "
                         "draw one task at a time")
    task = get_task(reports[0]["task"])
    setting, metric = task.evaluation.setting, task.evaluation.metric
    ylabel = metric_label(task.name)
    values = sorted({r[setting] for report in reports for r in report["results"]})
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    if len(values) == 1:
        heights = [metric_and_error(report["results"][0], metric) for report in reports]
        axis.bar(range(len(reports)), [h for h, _ in heights], yerr=[e for _, e in heights], capsize=4,
                 color=[f"C{i}" for i in range(len(reports))], alpha=0.8)
        axis.set_xticks(range(len(reports)), labels, fontsize=8)
        for i, (height, error) in enumerate(heights):  # inside the bar, clear of the error bars and references
            axis.text(i, height / 2, f"{height:.2f}\n+- {error:.2f}", ha="center", va="center", fontsize=9,
                      color="white", fontweight="bold", zorder=5,
                      bbox={"facecolor": f"C{i}", "edgecolor": "none", "boxstyle": "round,pad=0.3"})
        axis.set_title(f"{task.title}: {ylabel} at {setting} {values[0]}", fontsize=10)
    else:
        for i, report in enumerate(reports):
            rows = sorted(report["results"], key=lambda r: r[setting])
            points = [metric_and_error(r, metric) for r in rows]
            axis.errorbar([r[setting] for r in rows], [p for p, _ in points], yerr=[e for _, e in points],
                          marker="o", markersize=4, capsize=3, color=f"C{i}", label=labels[i])
        if min(values) > 0 and max(values) / min(values) >= 8:
            axis.set_xscale("log")
            axis.set_xticks(values, [str(v) for v in values])
            axis.minorticks_off()
        trained = [settings[setting] for settings in task.dataset_settings if setting in settings]
        if trained:  # the registry's datasets: where the models were trained, the rest is generalisation
            left = axis.get_xlim()[0]
            axis.axvspan(left, max(trained), color="0.5", alpha=0.12, linewidth=0,
                         label=f"in the training data ({setting} up to {max(trained)})")
            axis.set_xlim(left=left)
        axis.set_xlabel(setting)
        axis.legend(fontsize=8)
        axis.set_title(f"{task.title}: {ylabel} by {setting}", fontsize=10)
    for name, level in (references or {}).items():
        axis.axhline(level, color="0.35", linestyle="--", linewidth=1)
        axis.annotate(name, (1.0, level), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                      textcoords="offset points", ha="right", fontsize=8, color="0.25")
    if metric == "success":
        axis.set_ylim(-0.03, 1.08)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


@dataclass
class Args:
    """Draw one or more evaluations of a task (eval.json) as its metric against the protocol's setting."""

    evaluations: Annotated[tyro.conf.Positional[tuple[Path, ...]], OWN_DEFAULT]
    """eval.json files written by python -m training.evaluate --json, or checkpoint folders holding one"""
    out: Path = Path("scores.png")
    """the PNG to write"""
    reference: Annotated[tuple[str, ...], NONE_DEFAULT] = ()
    """levels to draw as dashed lines, as LABEL=VALUE pairs, e.g. --reference 'paper RATE=7.64' 'paper DT=6.83'"""


def main(args: Args) -> None:
    if not args.evaluations:
        raise SystemExit("error: give at least one evaluation, e.g. python -m training.scores "
                         "assets/checkpoints/tmaze/rate assets/checkpoints/tmaze/dt")
    references = {}
    for pair in args.reference:
        name, _, level = pair.rpartition("=")
        try:
            references[name.strip()] = float(level)
        except ValueError:
            raise SystemExit(f"error: --reference {pair!r}: expected LABEL=VALUE with a number, "
                             "e.g. 'paper RATE=7.64'") from None
        if not name.strip():
            raise SystemExit(f"error: --reference {pair!r}: the label before '=' is empty")
    png_out_or_exit("--out", args.out)
    reports = [load_evaluation(path, per_episode=False) for path in args.evaluations]
    labels = distinct_labels([label_of(report, evaluated_folder(path))
                              for report, path in zip(reports, args.evaluations, strict=True)],
                             reports, args.evaluations)
    try:
        figure = plot_scores(reports, labels, references)
        protocol = get_task(reports[0]["task"]).evaluation
        for report, label in zip(reports, labels, strict=True):
            rows = sorted(report["results"], key=lambda r: r[protocol.setting])
            cells = [(r[protocol.setting], *metric_and_error(r, protocol.metric)) for r in rows]
            print(f"{label}  " + "  ".join(f"{value}: {score:.3f} +- {error:.3f}" for value, score, error in cells))
        print(f"wrote {save_png(figure, args.out)}")
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}")
    except KeyError as error:  # get_task: an evaluation of a task this code does not know
        raise SystemExit(f"error: {error.args[0]}")


if __name__ == "__main__":
    run_main(main, cli(Args))
