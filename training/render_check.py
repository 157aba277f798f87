"""Does this machine render a task's observations as another did? Record them on one, compare on the other.

    python -m training.render_check --save frames_cpu.npz        # Memory Maze, on the machine of the data
    python -m training.render_check --compare frames_cpu.npz     # on another (a GPU's EGL), the same episodes
    python -m training.render_check --task minigrid_memory --save frames.npz

Plays `episodes` episodes (seeds `seed`, `seed` + 1, ...) of `steps` uniformly random actions each,
drawn from one stream seeded by `seed`, in the task's default settings, and keeps every observation
(the first after reset, then one per step) and every reward. --save writes them with the task's name
and the renderer (Memory Maze: MUJOCO_GL as rate_core chose it, and the OpenGL renderer: a GPU's,
or Mesa's llvmpipe on a CPU) to a .npz file; --compare plays the
same episodes and prints how this machine's observations differ from the file's: whether the rewards
are equal, the share of identical observations, the share of values that differ (by more than 8
levels too), the largest and the mean absolute difference. A model trained on one machine's frames
may score differently on another's (`training.evaluate --pixel-noise` nudges frames on purpose).
The last line reads `identical_observations=<share> differing_values=<share> rewards_equal=<bool>`.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np

from rate_core.tasks import Task
from training.cli import OWN_DEFAULT, at_least, cli, run_main, task_or_exit, writable_file_or_exit


@dataclass
class Args:
    """Record a task's observations over fixed seeds and actions, or compare them with a recording."""

    task: Annotated[str | None, OWN_DEFAULT] = None
    """task name from the registry (rate_core.tasks) (default: with --compare the recording's, else memory_maze)"""
    save: Path | None = None
    """write the observations and rewards to this .npz file"""
    compare: Path | None = None
    """compare this machine's observations and rewards with this .npz file's (written by --save)"""
    episodes: int = 2
    """episodes to play (with --compare: the recording's)"""
    steps: int = 250
    """random actions per episode, fewer where an episode ends first (with --compare: the recording's)"""
    seed: int = 0
    """seed of the first episode (episode i uses seed + i) and of the action stream (with --compare: the
    recording's)"""


def record(task: Task, episodes: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(observations (M, *obs_shape), rewards (R,), renderer) of the episodes, every episode's in turn."""
    env = task.make_env(**task.default_settings)
    rng = np.random.default_rng(seed)
    observations, rewards = [], []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            if not episode:  # an env that renders with a library it can name says which (Memory Maze)
                name = getattr(env.unwrapped, "renderer_name", None)
                drawn_by = name() if name else "the environment's own"
            observations.append(obs)
            for action in rng.integers(task.act_dim, size=steps):
                obs, reward, terminated, truncated, _ = env.step(action)
                observations.append(obs)
                rewards.append(reward)
                if terminated or truncated:
                    break
    finally:
        env.close()
    return np.stack(observations), np.asarray(rewards, dtype=np.float64), drawn_by


def differences(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """How two stacks of observations of one shape differ."""
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    return {"identical_observations": float((diff.reshape(len(diff), -1).max(1) == 0).mean()),
            "differing_values": float((diff > 0).mean()), "differing_by_more_than_8": float((diff > 8).mean()),
            "max_difference": float(diff.max()), "mean_abs_difference": float(diff.mean())}


def load_recording(path: Path) -> dict:
    """The recording in `path` (SystemExit saying what to do if it is not one)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            recording = {name: data[name] for name in ("task", "renderer", "seed", "steps", "episodes",
                                                        "observations", "rewards")}
    except FileNotFoundError:
        raise SystemExit(f"error: --compare {path} does not exist; write it with python -m training.render_check "
                         f"--save {path} on the machine to compare with")
    except KeyError as error:
        raise SystemExit(f"error: --compare {path} is not a recording of training.render_check --save (it has no "
                         f"{error.args[0]!r})")
    except (OSError, ValueError, EOFError):
        raise SystemExit(f"error: --compare {path} is not a recording of training.render_check --save (not a .npz "
                         f"file it wrote)")
    return {name: value.item() if value.ndim == 0 else value for name, value in recording.items()}


def main(args: Args) -> None:
    if (args.save is None) == (args.compare is None):
        raise SystemExit("error: give --save FILE (record here) or --compare FILE (compare with a recording)")
    theirs = None if args.compare is None else load_recording(args.compare)
    task = task_or_exit(args.task or (theirs["task"] if theirs else "memory_maze"))
    at_least("--episodes", args.episodes, 1)
    at_least("--steps", args.steps, 1)
    at_least("--seed", args.seed, 0)
    if args.save is not None and args.save.suffix != ".npz":
        raise SystemExit(f"error: --save {args.save}: the file name must end in .npz")
    if args.save is not None:  # before the recording, not after it
        args.save.parent.mkdir(parents=True, exist_ok=True)
        writable_file_or_exit("--save", args.save)
    if theirs is not None:
        if theirs["task"] != task.name:
            raise SystemExit(f"error: --compare {args.compare} holds {theirs['task']} observations; give "
                             f"--task {theirs['task']}")
        # play what the file played, whatever the options say
        args.episodes, args.steps, args.seed = (int(theirs[name]) for name in ("episodes", "steps", "seed"))
    observations, rewards, drawn_by = record(task, args.episodes, args.steps, args.seed)
    print(f"{task.title}: {len(observations)} observations {observations.shape[1:]} from {args.episodes} "
          f"episode{'s' * (args.episodes != 1)} (seeds from {args.seed}) of up to {args.steps} random actions; "
          f"renderer: {drawn_by}")
    if args.save is not None:  # (its folder made and checked above)
        partial = args.save.with_name(args.save.name + ".partial.npz")  # a killed run leaves no half-written file
        np.savez_compressed(partial, task=task.name, renderer=drawn_by, seed=args.seed, steps=args.steps,
                            episodes=args.episodes, observations=observations, rewards=rewards)
        os.replace(partial, args.save)
        print(f"wrote {args.save}")
        return
    if theirs["observations"].shape != observations.shape or theirs["rewards"].shape != rewards.shape:
        raise SystemExit(f"error: the episodes ran differently here: {observations.shape[0]} observations against "
                         f"{theirs['observations'].shape[0]} in {args.compare} (another version of the environment?)")
    found = differences(observations, theirs["observations"])
    equal = bool(np.array_equal(rewards, theirs["rewards"]))
    print(f"against {args.compare} (renderer there: {theirs['renderer']}): rewards equal {equal}; "
          f"identical observations {found['identical_observations']:.1%}; values differing "
          f"{found['differing_values']:.3%}, by more than 8 levels {found['differing_by_more_than_8']:.3%}; "
          f"largest difference {found['max_difference']:g}, mean absolute difference "
          f"{found['mean_abs_difference']:.4f}")
    print(f"identical_observations={found['identical_observations']:.4f} "
          f"differing_values={found['differing_values']:.6f} rewards_equal={equal}")


if __name__ == "__main__":
    run_main(main, cli(Args))
