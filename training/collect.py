"""Collect a task's expert dataset into data/ (format: training/dataset.py).

    python -m training.collect --task tmaze                     # the task's default dataset
    python -m training.collect --task tmaze --episodes 100 --out data/tmaze/small
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from tqdm import tqdm

from rate_core.tasks import Task, get_task
from training.dataset import write_dataset


@dataclass
class Args:
    """Run the task's expert and write its episodes as an offline dataset."""

    task: str = "tmaze"
    """task name from the registry (rate_core.tasks)"""
    out: Path | None = None
    """dataset folder (default: data/<task>/expert)"""
    episodes: int | None = None
    """episodes per environment setting (default: the task's)"""
    seed: int = 0
    """seed of the first episode; episode i uses seed + i"""


def run_episode(task: Task, settings: dict, seed: int) -> dict:
    """One expert episode: observations (T, ...), actions (T,), rewards (T,), and its return."""
    env = task.make_env(**settings)
    expert = task.make_expert()
    obs, info = env.reset(seed=seed)
    expert.reset(info)
    observations, actions, rewards = [], [], []
    while True:
        action = expert.act(obs, info)
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        if terminated or truncated:
            break
    env.close()
    return {"observations": np.stack(observations), "actions": np.array(actions), "rewards": np.array(rewards),
            "return": float(np.sum(rewards))}


def collect(task: Task, out: Path, episodes_per_setting: int, seed: int) -> Path:
    episodes = []
    total = episodes_per_setting * len(task.dataset_settings)
    with tqdm(total=total, desc=f"collecting {task.name}", unit="episode") as progress:
        for settings in task.dataset_settings:
            for _ in range(episodes_per_setting):
                episodes.append(run_episode(task, settings, seed + len(episodes)))
                progress.update()
    returns = np.array([e["return"] for e in episodes])
    path = write_dataset(out, task.name, episodes, {
        "settings": list(task.dataset_settings), "episodes_per_setting": episodes_per_setting, "seed": seed,
        "expert": type(task.make_expert()).__name__, "mean_return": float(returns.mean()),
    })
    steps = sum(len(e["actions"]) for e in episodes)
    print(f"wrote {len(episodes)} episodes ({steps:,} steps, mean return {returns.mean():.3f}) to {path}")
    return path


def main(args: Args) -> None:
    task = get_task(args.task)
    out = args.out or Path("data") / task.name / "expert"
    collect(task, out, args.episodes or task.dataset_episodes, args.seed)


if __name__ == "__main__":
    main(tyro.cli(Args))
