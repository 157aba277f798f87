"""Measure how fast a task's single environment steps, with uniformly random actions.

    python -m training.bench_env --task vizdoom_two_colors --steps 2000
    python -m training.bench_env --task tmaze

The env is made with the task's default settings, so observations come at the size the model
trains on (e.g. ViZDoom's 320x180 screen resized to 112x64). Resets at episode ends are part of
the timed loop, as they are in collection and evaluation; making the env is timed apart.
The last line reads `steps_per_second=<x>`.
"""

import time
from dataclasses import dataclass

import numpy as np

from rate_core.tasks import Task
from training.cli import at_least, cli, run_main, task_or_exit


@dataclass
class Args:
    """Measure env steps per second of a task's single env with random actions."""

    task: str = "vizdoom_two_colors"
    """task name from the registry (rate_core.tasks)"""
    steps: int = 2000
    """env steps to time"""
    seed: int = 0
    """seed of the first episode (episode i uses seed + i) and of the random actions"""


def bench(task: Task, steps: int, seed: int) -> dict:
    """Steps `task`'s env `steps` times with random actions; returns timings and counts."""
    started = time.perf_counter()
    env = task.make_env(**task.default_settings)
    made = time.perf_counter() - started
    rng = np.random.default_rng(seed)
    actions = rng.integers(task.act_dim, size=steps)
    episodes = 0
    started = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    for action in actions:
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            episodes += 1
            obs, _ = env.reset(seed=seed + episodes)
    seconds = time.perf_counter() - started
    env.close()
    return {"steps": steps, "episodes_finished": episodes, "seconds": seconds, "make_seconds": made,
            "obs_shape": tuple(np.shape(obs)), "steps_per_second": steps / seconds}


def main(args: Args) -> None:
    task = task_or_exit(args.task)
    at_least("--steps", args.steps, 1)
    at_least("--seed", args.seed, 0)
    result = bench(task, args.steps, args.seed)
    print(f"{task.title}: {result['steps']} steps ({result['episodes_finished']} episodes finished) in "
          f"{result['seconds']:.2f} s, observations {result['obs_shape']}, env made in {result['make_seconds']:.2f} s")
    print(f"steps_per_second={result['steps_per_second']:.0f}")


if __name__ == "__main__":
    run_main(main, cli(Args))
