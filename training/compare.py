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

import numpy as np
import tyro

from training.cli import cli


@dataclass
class Args:
    """Paired comparison of two evaluate --json files: mean difference A - B with its SEM, per setting."""

    first: tyro.conf.Positional[Path]
    """evaluation A (an eval.json written by training.evaluate)"""
    second: tyro.conf.Positional[Path]
    """evaluation B, of the same task"""


def load_evaluation(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: {path} does not exist; write it with python -m training.evaluate --json {path}")
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {path} is not JSON ({error})")
    if not isinstance(report, dict) or "results" not in report or "protocol" not in report:
        raise SystemExit(f"error: {path} is not an evaluation written by python -m training.evaluate")
    for result in report["results"]:
        if "seeds" not in result or "returns" not in result:
            raise SystemExit(f"error: {path} has no per-episode returns (written by an older evaluator); "
                             "evaluate the checkpoint again to compare it")
    return report


def paired(a: dict, b: dict) -> dict:
    """Per-episode comparison of two result rows (same setting value) on the seeds both played."""
    returns_a = dict(zip(a["seeds"], a["returns"]))
    returns_b = dict(zip(b["seeds"], b["returns"]))
    seeds = sorted(returns_a.keys() & returns_b.keys())
    if not seeds:
        raise ValueError("the two evaluations share no seeds")
    x = np.array([returns_a[s] for s in seeds])
    y = np.array([returns_b[s] for s in seeds])
    diff = x - y
    sem = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"episodes": len(seeds), "mean_first": float(x.mean()), "mean_second": float(y.mean()),
            "difference": float(diff.mean()), "difference_sem": sem,
            "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum())}


def compare(first: dict, second: dict) -> list[tuple[object, dict]]:
    """(setting value, paired figures) for every value of the protocol's setting that both evaluated."""
    if first["task"] != second["task"]:
        raise ValueError(f"the evaluations are of different tasks: {first['task']} and {second['task']}")
    setting = first["protocol"]["setting"]
    rows_b = {r[setting]: r for r in second["results"]}
    rows = [(r[setting], paired(r, rows_b[r[setting]])) for r in first["results"] if r[setting] in rows_b]
    if not rows:
        raise ValueError(f"the evaluations share no value of {setting}")
    return rows


def main(args: Args) -> None:
    first, second = load_evaluation(args.first), load_evaluation(args.second)
    try:
        rows = compare(first, second)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    for name, report in (("A", first), ("B", second)):
        horizon = report.get("memory_horizon")  # older files have none: the whole episode
        print(f"{name}: {report['checkpoint']} ({report['mode']}), target return {report['protocol']['target_return']}"
              + (f", memory horizon {horizon} segment{'s' if horizon > 1 else ''}" if horizon else ""))
    differing = [k for k in ("target_return", "sample_actions", "temperature")  # older files have no temperature
                 if first["protocol"].get(k, 1.0) != second["protocol"].get(k, 1.0)]
    if first.get("overrides") != second.get("overrides"):
        differing.append("environment settings")
    if first.get("memory_horizon") != second.get("memory_horizon"):
        differing.append("memory horizon")
    if differing:
        print(f"note: the two evaluations differ in {', '.join(differing)}")
    setting = first["protocol"]["setting"]
    print(f"{setting:>12} {'episodes':>8} {'A':>9} {'B':>9} {'A - B':>17}  A wins / ties / B wins")
    for value, row in rows:
        print(f"{value:>12} {row['episodes']:>8} {row['mean_first']:>9.3f} {row['mean_second']:>9.3f} "
              f"{row['difference']:>+8.3f} +- {row['difference_sem']:.3f}  "
              f"{row['wins']} / {row['ties']} / {row['losses']}")


if __name__ == "__main__":
    main(cli(Args))
