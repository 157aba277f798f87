"""Compare two evaluations of the same task episode by episode (paired on the seeds both played).

    python -m training.evaluate --checkpoint runs/memory_maze/rate/model --json rate.json
    python -m training.evaluate --checkpoint runs/memory_maze/dt/model --json dt.json
    python -m training.compare rate.json dt.json

Both checkpoints meet the same episodes (the seeds fix the maze, the cue, the items) and draw their
actions from random streams seeded alike; the SEM of the per-episode differences is the error bar for
"A scores more than B". It is smaller than the two SEMs combined where episodes share difficulty
(some mazes are hard for every policy), about the same where they do not.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

from training.cli import OWN_DEFAULT, cli, run_main
from training.figures import plt, png_out_or_exit, save_png


@dataclass
class Args:
    """Paired comparison of two evaluate --json files: mean difference A - B with its SEM, per setting."""

    first: tyro.conf.Positional[Path]
    """evaluation A (an eval.json written by training.evaluate, or a checkpoint folder holding one)"""
    second: tyro.conf.Positional[Path]
    """evaluation B, of the same task"""
    plot: Annotated[Path | None, OWN_DEFAULT] = None
    """also draw the pairs into this PNG: each episode a point at (B's return, A's return), one panel per
    setting value (default: no plot)"""


def load_evaluation(path: Path, per_episode: bool = True) -> dict:
    """An eval.json written by training.evaluate, or the one in a checkpoint folder (SystemExit saying what to do
    if it is not one, or if per_episode and it lacks the per-episode seeds and returns that pairing needs). Options
    newer than the file (memory_horizon, hide_actions, pixel_noise) are filled in with what it played."""
    path = Path(path)
    if path.is_dir():
        if (path / "meta.json").is_file() and not (path / "config.json").is_file():
            raise SystemExit(f"error: {path} is a dataset folder; give an evaluation: an eval.json, or the checkpoint "
                             f"folder that holds one")
        if not (path / "eval.json").is_file():
            raise SystemExit(f"error: {path} holds no eval.json; write it with python -m training.evaluate "
                             f"--checkpoint {path} --json {path / 'eval.json'}")
        path = path / "eval.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: {path} does not exist; write it with python -m training.evaluate "
                         f"--checkpoint CHECKPOINT --json {path}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: {path} is not JSON ({error})")
    except OSError as error:
        raise SystemExit(f"error: {path} cannot be read ({error.strerror})")
    if not isinstance(report, dict) or "results" not in report or "protocol" not in report:
        raise SystemExit(f"error: {path} is not an evaluation written by python -m training.evaluate")
    if not isinstance(report["results"], list) or not report["results"]:
        raise SystemExit(f"error: {path} holds no results (an evaluation stopped before its first setting ended?); "
                         f"evaluate the checkpoint again")
    for result in report["results"] if per_episode else ():
        if "seeds" not in result or "returns" not in result:
            raise SystemExit(f"error: {path} has no per-episode returns (written by an older evaluator); "
                             "evaluate the checkpoint again to compare it")
    report.setdefault("memory_horizon", None)  # older files have none: the whole episode
    report.setdefault("hide_actions", 0.0)  # nor this: every action shown
    report.setdefault("pixel_noise", 0.0)  # nor this: the frames as the env rendered them
    return report


def paired_returns(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray]:
    """The returns of two result rows (same setting value) on the seeds both played, in seed order: (E,), (E,)."""
    returns_a = dict(zip(a["seeds"], a["returns"], strict=True))
    returns_b = dict(zip(b["seeds"], b["returns"], strict=True))
    seeds = sorted(returns_a.keys() & returns_b.keys())
    if not seeds:
        raise ValueError("the two evaluations share no seeds")
    return np.array([returns_a[s] for s in seeds]), np.array([returns_b[s] for s in seeds])


def paired(a: dict, b: dict) -> dict:
    """Per-episode comparison of two result rows (same setting value) on the seeds both played."""
    x, y = paired_returns(a, b)
    diff = x - y
    sem = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"episodes": len(x), "mean_first": float(x.mean()), "mean_second": float(y.mean()),
            "difference": float(diff.mean()), "difference_sem": sem,
            "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum())}


def shared_rows(first: dict, second: dict) -> list[tuple[object, dict, dict]]:
    """(setting value, row of first, row of second) for every value of the protocol's setting both evaluated."""
    if first["task"] != second["task"]:
        raise ValueError(f"the evaluations are of different tasks: {first['task']} and {second['task']}")
    setting = first["protocol"]["setting"]
    rows_b = {r[setting]: r for r in second["results"]}
    rows = [(r[setting], r, rows_b[r[setting]]) for r in first["results"] if r[setting] in rows_b]
    if not rows:
        raise ValueError(f"the evaluations share no value of {setting}")
    return rows


def compare(first: dict, second: dict) -> list[tuple[object, dict]]:
    """(setting value, paired figures) for every value of the protocol's setting that both evaluated."""
    return [(value, paired(a, b)) for value, a, b in shared_rows(first, second)]


def label_of(report: dict, folder: Path | None = None) -> str:
    """An evaluation's short name for a legend or an axis: the last two path parts of the checkpoint folder it
    was read from (default: of the checkpoint it names; a train run's model/ folder goes by its run) and its mode."""
    path = Path(folder).resolve() if folder is not None else Path(str(report["checkpoint"]))
    if path.name == "model":  # runs/<task>/<run>/model: the run names it
        path = path.parent
    return f"{'/'.join(path.parts[-2:])} ({report['mode']})"



def evaluated_folder(path: Path) -> Path | None:
    """The checkpoint folder an evaluation given as `path` belongs to, for its label: the folder itself, or
    the folder of its own eval.json (whose "checkpoint" may name the run that made it); None for any other
    JSON (then its "checkpoint" names what it evaluated: another JSON may sit in a folder it did not evaluate)."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent if path.name == "eval.json" and (path.parent / "config.json").is_file() else None


def distinct_labels(labels: list[str], reports: list[dict], paths: list[Path]) -> list[str]:
    """The labels, where two or more are the same (e.g. one checkpoint evaluated twice), each of those
    extended by what sets its evaluation apart (memory horizon, hidden actions, pixel noise, target
    return, temperature, seed), and by its file if that does not tell them apart."""
    options = [("memory_horizon", "memory horizon"), ("hide_actions", "actions hidden"), ("pixel_noise", "pixel noise")]
    protocol = [("target_return", "target return"), ("temperature", "temperature")]
    out = list(labels)
    for i, label in enumerate(labels):
        same = [j for j, other in enumerate(labels) if other == label]
        if len(same) < 2:
            continue
        value = {name: [reports[j].get(key) for j in same] for key, name in options + [("seed", "seed")]}
        value |= {name: [reports[j]["protocol"].get(key) for j in same] for key, name in protocol}
        mine = same.index(i)
        extras = [f"{name} {'all' if values[mine] is None else values[mine]}"  # None: the whole episode
                  for name, values in value.items() if len(set(map(str, values))) > 1]
        out[i] = f"{label}, {', '.join(extras)}" if extras else label
    return [f"{label} [{Path(path).name}]" if out.count(label) > 1 else label
            for label, path in zip(out, paths, strict=True)]

def plot_pairs(first: dict, second: dict, labels: tuple[str, str] | None = None):
    """A figure with one panel per shared setting value: each episode as a point at (B's return, A's return),
    its area growing with the episodes that share it; above the diagonal A did better. labels: A's and B's
    names on the axes (default: label_of each)."""
    label_a, label_b = labels or (label_of(first), label_of(second))
    rows = shared_rows(first, second)
    setting = first["protocol"]["setting"]
    columns = min(3, len(rows))  # at most three panels a row, so that their text stays readable
    lines = -(-len(rows) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns + 0.6, 4.6 * lines), squeeze=False)
    for axis in axes.flat[len(rows):]:
        axis.set_visible(False)
    for axis, (value, a, b) in zip(axes.flat, rows, strict=False):
        x, y = paired_returns(a, b)
        figures = paired(a, b)
        low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        pad = 0.12 * (high - low) if high > low else 0.5
        # episodes within 4% of the range of each other are one point (returns that vary a little, as
        # Minigrid's, would otherwise pile their counts into an unreadable smudge)
        grid = (high - low) / 25 if high > low else 1.0
        points, counts = np.unique(np.round(np.stack([y, x], axis=1) / grid) * grid, axis=0, return_counts=True)
        axis.plot([low - pad, high + pad], [low - pad, high + pad], color="0.6", linestyle="--", linewidth=1)
        sizes = 24 + 600 * counts / len(x)  # area: a floor for single episodes, then the share of the episodes
        axis.scatter(points[:, 0], points[:, 1], s=sizes, alpha=0.6, color="tab:blue", edgecolors="none")
        for (px, py), count in zip(points, counts, strict=True):
            if count > 1:
                axis.annotate(str(count), (px, py), ha="center", va="center", fontsize=7, color="white")
        axis.set_xlim(low - pad, high + pad)
        axis.set_ylim(low - pad, high + pad)
        axis.set_aspect("equal")
        axis.set_xlabel(f"B: return, {label_b}", fontsize=8)
        axis.set_ylabel(f"A: return, {label_a}", fontsize=8)
        axis.set_title(f"{setting} = {value}: A - B {figures['difference']:+.2f} +- {figures['difference_sem']:.2f}\n"
                       f"A ahead in {figures['wins']}, ties {figures['ties']}, B ahead in {figures['losses']} "
                       f"of {figures['episodes']}", fontsize=9)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def main(args: Args) -> None:
    if args.plot is not None:
        png_out_or_exit("--plot", args.plot)
    first, second = load_evaluation(args.first), load_evaluation(args.second)
    try:
        rows = compare(first, second)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    for name, report, given in (("A", first, args.first), ("B", second, args.second)):
        horizon, hidden, noise = report["memory_horizon"], report["hide_actions"], report["pixel_noise"]
        # the file given, and where it was evaluated if elsewhere (a shipped eval.json keeps its run's path)
        folder = given if given.is_dir() else given.parent
        same = Path(report["checkpoint"]).resolve() in (folder.resolve(), given.resolve())
        where = "" if same else f"evaluated as {report['checkpoint']}, "
        print(f"{name}: {given} ({where}{report['mode']}), target return {report['protocol']['target_return']}"
              + (f", memory horizon {horizon} segment{'s' if horizon > 1 else ''}" if horizon else "")
              + (f", action inputs hidden with probability {hidden}" if hidden else "")
              + (f", pixels nudged with probability {noise}" if noise else ""))
    differing = [k for k in ("target_return", "sample_actions", "temperature")  # older files have no temperature
                 if first["protocol"].get(k, 1.0) != second["protocol"].get(k, 1.0)]
    if first.get("overrides") != second.get("overrides"):
        differing.append("environment settings")
    if first["memory_horizon"] != second["memory_horizon"]:
        differing.append("memory horizon")
    if first["hide_actions"] != second["hide_actions"]:
        differing.append("hidden actions")
    if first["pixel_noise"] != second["pixel_noise"]:
        differing.append("pixel noise")
    sampled = first["protocol"].get("sample_actions") or second["protocol"].get("sample_actions")
    if sampled and first.get("seed", 0) != second.get("seed", 0):  # evaluate --seed also seeds the action draws
        differing.append("--seed (the sampled actions of a shared episode come from different random streams)")
    if differing:
        print(f"note: the two evaluations differ in {', '.join(differing)}")
    setting = first["protocol"]["setting"]
    for name, report, other in (("A", first, second), ("B", second, first)):
        alone = sorted({r[setting] for r in report["results"]} - {r[setting] for r in other["results"]})
        if alone:
            print(f"note: only {name} evaluated {setting} {', '.join(map(str, alone))} (left out below)")
    print(f"{setting:>12} {'episodes':>8} {'A':>9} {'B':>9} {'A - B':>17}  A wins / ties / B wins"
          "   (mean returns over the episodes both played)")
    for value, row in rows:
        print(f"{value:>12} {row['episodes']:>8} {row['mean_first']:>9.3f} {row['mean_second']:>9.3f} "
              f"{row['difference']:>+8.3f} +- {row['difference_sem']:.3f}  "
              f"{row['wins']} / {row['ties']} / {row['losses']}")
    if args.plot is not None:
        try:
            given = (args.first, args.second)
            labels = distinct_labels([label_of(report, evaluated_folder(path))
                                      for report, path in zip((first, second), given, strict=True)],
                                     [first, second], list(given))
            print(f"wrote {save_png(plot_pairs(first, second, tuple(labels)), args.plot, tight=True)}")
        except (ValueError, OSError) as error:
            raise SystemExit(f"error: --plot: {error}")


if __name__ == "__main__":
    run_main(main, cli(Args))
