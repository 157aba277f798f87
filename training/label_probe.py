"""Would another teacher label the same states differently? Ride a second teacher along the first's episodes.

    python -m training.label_probe --task memory_maze --b seen_only=1 --episodes 4

Teacher A (`--a`: its `collect --teacher-options`) plays each episode as it would when collecting
(its random actions included); teacher B (`--b`) watches the same steps and gives its own label at
each. Printed: A's mean return, and how often B's label is A's, over all steps and over the first
`--early` steps of each episode. Agreement near 1 means data from B would be the data from A: no
need to collect and train on it to know it changes nothing.
"""

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from tqdm import tqdm

from rate_core.tasks import get_task
from training.cli import NONE_DEFAULT, OWN_DEFAULT, AtLeast, check_env_settings, cli, run_main, task_or_exit
from training.collect import parse_settings, parse_teacher_options


@dataclass
class Args:
    """Label the episodes of one teacher with another and count where they agree."""

    task: str = "memory_maze"
    """task name from the registry (one with a teacher)"""
    a: Annotated[tuple[str, ...], NONE_DEFAULT] = ()
    """teacher A's options as NAME=NUMBER (collect --teacher-options); A acts"""
    b: Annotated[tuple[str, ...], NONE_DEFAULT] = ()
    """teacher B's options as NAME=NUMBER; B only labels"""
    episodes: Annotated[int, AtLeast(1)] = 4
    """episodes, seeds from --seed"""
    seed: Annotated[int, AtLeast(0)] = 1000000
    """first seed (the shipped data's first)"""
    early: Annotated[int, AtLeast(1)] = 200
    """steps counted as the start of an episode"""
    settings: Annotated[tuple[str, ...], OWN_DEFAULT] = ()
    """environment settings as NAME=INT (default: the task's)"""


def probe(task_name: str, a: dict, b: dict, episodes: int, seed: int, early: int = 200,
          settings: dict | None = None) -> dict:
    """{"return": A's mean return, "agree": share of steps where B's label is A's, "agree_early": the same
    over each episode's first `early` steps, "steps": steps counted}."""
    task = get_task(task_name)
    env = task.make_env(**{**task.default_settings, **(settings or {})})
    returns, agree, agree_early = [], [], []
    try:
        for episode in tqdm(range(episodes), desc=f"{task.name} labels", unit="episode"):
            teacher_a, teacher_b = task.make_teacher(**a), task.make_teacher(**b)
            obs, info = env.reset(seed=seed + episode)
            teacher_a.reset(env, info)
            teacher_b.reset(env, info)
            total, done, step = 0.0, False, 0
            while not done:
                action, label_a = teacher_a.act_and_label(env, obs, info)
                label_b = teacher_b.act_and_label(env, obs, info)[1]
                agree.append(label_a == label_b)
                if step < early:
                    agree_early.append(label_a == label_b)
                obs, reward, terminated, truncated, info = env.step(action)
                total += float(reward)
                done, step = terminated or truncated, step + 1
            returns.append(total)
    finally:
        env.close()
    return {"return": float(np.mean(returns)), "agree": float(np.mean(agree)),
            "agree_early": float(np.mean(agree_early)), "steps": len(agree)}


def main(args: Args) -> None:
    task = task_or_exit(args.task)
    if task.make_teacher is None:
        raise SystemExit(f"error: task {task.name} has no teacher; pick one that has (e.g. memory_maze)")
    settings = parse_settings(task, args.settings)
    check_env_settings(task, [settings], "--settings")
    result = probe(task.name, parse_teacher_options(task, args.a, "--a"), parse_teacher_options(task, args.b, "--b"),
                   args.episodes, args.seed, args.early, settings)
    print(f"teacher A ({' '.join(args.a) or 'defaults'}): mean return {result['return']:.2f} over {args.episodes} "
          f"episodes from seed {args.seed}")
    print(f"teacher B ({' '.join(args.b) or 'defaults'}) gives A's label at {result['agree']:.4f} of "
          f"{result['steps']} steps, {result['agree_early']:.4f} of the first {args.early} of each episode")


if __name__ == "__main__":
    run_main(main, cli(Args))
