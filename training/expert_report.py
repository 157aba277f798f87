"""How good is a task's expert? Run it on the evaluation's balanced seeds and report.

    python -m training.expert_report --task minigrid_memory --episodes 100 --settings size=41
    python -m training.expert_report --task vizdoom_two_colors --episodes 100 --settings step_cap=2100

Prints success rate, mean return (with SEM) and mean length, per value of the task's balance key
(e.g. pillar colour) too, and writes them as JSON with --json.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from tqdm import tqdm

from rate_core.tasks import get_task
from training.cli import (OWN_DEFAULT, at_least, check_env_settings, cli, run_main, task_or_exit,
                          writable_file_or_exit)
from training.collect import parse_settings, run_episode
from training.evaluate import balanced_seeds, summarize


@dataclass
class Args:
    """Score a task's expert over seeds balanced like the evaluation's."""

    task: str = "tmaze"
    """task name from the registry"""
    episodes: int = 100
    """episodes (balanced between the two values of the task's balance key)"""
    settings: Annotated[tuple[str, ...], OWN_DEFAULT] = ()
    """environment settings as NAME=INT (default: the task's default settings)"""
    seed: int = 0
    """first seed"""
    json: Path | None = None
    """also write the report here"""


def report(task_name: str, episodes: int, settings: dict, seed: int) -> dict:
    task = get_task(task_name)
    settings = {**task.default_settings, **settings}
    seeds = balanced_seeds(task, settings, episodes, seed)
    runs = [run_episode(task, settings, s) for s in tqdm(seeds, desc=f"{task.name} expert", unit="episode")]
    returns = np.array([r["return"] for r in runs])
    successes = np.array([r["success"] for r in runs])
    lengths = np.array([len(r["actions"]) for r in runs])
    result = {"task": task.name, "settings": settings, "episodes": episodes, "seed": seed,
              **summarize(returns, successes), "mean_length": float(lengths.mean())}
    key = task.evaluation.balance_key
    if key:
        names = dict(task.evaluation.group_names)
        values = []
        env = task.make_env(**settings)
        for s in seeds:
            values.append(np.asarray(env.reset(seed=s)[1][key]).item())
        env.close()
        values = np.array(values)
        result["groups"] = {str(names.get(v, v)): {"episodes": int((values == v).sum()),
                                                   **summarize(returns[values == v], successes[values == v]),
                                                   "mean_length": float(lengths[values == v].mean())}
                            for v in np.unique(values).tolist()}
    return result


def main(args: Args) -> None:
    task = task_or_exit(args.task)
    at_least("--episodes", args.episodes, 1)
    at_least("--seed", args.seed, 0)
    settings = parse_settings(task, args.settings)
    check_env_settings(task, [{**task.default_settings, **settings}], "--settings")
    if args.json:
        writable_file_or_exit("--json", args.json)
    result = report(args.task, args.episodes, settings, args.seed)

    def scores(row: dict) -> str:  # success only where the task scores it (ViZDoom's, Memory Maze's envs report none)
        success = f"success {row['success_rate']:.3f}, " if task.evaluation.metric == "success" else ""
        error = f" +- {row['return_sem']:.3f}" if row["episodes"] > 1 else " (one episode: no standard error)"
        return f"{success}return {row['mean_return']:.3f}{error}, mean length {row['mean_length']:.1f}"

    print(f"{result['task']} expert over {result['episodes']} episodes, {result['settings']}: {scores(result)}")
    for name, group in result.get("groups", {}).items():
        print(f"  {name:>8}: {group['episodes']} episodes, {scores(group)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main, cli(Args))
