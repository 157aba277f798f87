"""Collect a task's expert dataset into data/ (format: training/dataset.py).

    python -m training.collect --task tmaze                     # the task's default dataset
    python -m training.collect --task tmaze --episodes 100 --out data/tmaze/small
    python -m training.collect --task memory_maze --teacher --policy runs/memory_maze/rate/model   # DAgger round
"""

import collections
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from tqdm import tqdm

from rate_core.checkpoint import CheckpointError, check_replaceable, load_checkpoint
from rate_core.model import MemoryTransformer
from rate_core.rollout import make_policy, sample_actions
from rate_core.tasks import Task, get_task
from training.cli import (NONE_DEFAULT, OWN_DEFAULT, at_least, check_env_settings, cli, folder_out_or_exit, run_main,
                          stop_pool, task_or_exit, worker_pool)
from training.dataset import DATASET_FILES, DatasetWriter


@dataclass
class Args:
    """Run the task's expert and write its episodes as an offline dataset."""

    task: str = "tmaze"
    """task name from the registry (rate_core.tasks)"""
    out: Annotated[Path | None, OWN_DEFAULT] = None
    """dataset folder (default: data/<task>/expert)"""
    episodes: Annotated[int | None, OWN_DEFAULT] = None
    """episodes per environment setting (default: the task's)"""
    seed: Annotated[int | None, OWN_DEFAULT] = None
    """seed of the first episode; episode i uses seed + i (default: the task's dataset_seed, far from the
    evaluator's seeds where seeds draw the layout)"""
    workers: int = 1
    """processes running the expert in parallel (the dataset is the same for any number)"""
    teacher: bool = False
    """run the task's teacher instead of its expert (ViZDoom-Two-Colors: detours to the other colour;
    Memory Maze: clean labels of the noisy expert's steps; the dataset holds actions and labels)"""
    settings: Annotated[tuple[str, ...], OWN_DEFAULT] = ()
    """environment settings as NAME=INT that replace the task's dataset settings (e.g. cue=1 for
    ViZDoom-Two-Colors' oracle cue)"""
    teacher_options: Annotated[tuple[str, ...], NONE_DEFAULT] = ()
    """with --teacher: the teacher's settings as NAME=NUMBER (e.g. noise=0.3: random actions at 30% of
    the steps, all still labelled with the expert's action; detour=0 for ViZDoom-Two-Colors)"""
    policy: Path | None = None
    """with --teacher: a checkpoint folder that acts instead of the teacher (sampled actions from the
    task's target return), every step still labelled with the teacher's noise-free action: one round
    of DAgger, so the data covers the states where that policy goes astray (join it to the teacher's
    data with python -m training.merge)"""


def _assignments(items: tuple[str, ...], known: list[str], convert, owner: str, what: str) -> dict:
    """{NAME: convert(VALUE)} from command-line items NAME=VALUE whose NAME is in `known`; SystemExit
    with what to give otherwise."""
    form = f"NAME={'INT' if convert is int else 'NUMBER'}"
    values = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in known:
            raise SystemExit(f"error: {owner} has no {what} {name!r}; it has {', '.join(known) or 'none'} "
                             f"(give {form})")
        try:
            values[name] = convert(value)
        except ValueError:
            raise SystemExit(f"error: {what}s are {form}, got {item!r}") from None
    return values


def parse_settings(task: Task, items: tuple[str, ...]) -> dict:
    """{NAME: INT} from command-line items NAME=INT, checked against the task's environment options."""
    options = [name for name in inspect.signature(task.make_env).parameters if name != "render_mode"]
    return _assignments(items, options, int, task.name, "environment setting")


def parse_teacher_options(task: Task, items: tuple[str, ...], flag: str = "--teacher-options") -> dict:
    """{NAME: number} from command-line items NAME=NUMBER (option `flag`), checked against the settings
    the task's teacher has."""
    if not items:
        return {}
    if task.make_teacher is None:
        raise SystemExit(f"error: task {task.name} has no teacher to give {flag} to")
    defaults = {name: value for name, value in vars(task.make_teacher()).items() if isinstance(value, (int, float))}
    options = _assignments(items, list(defaults), float, f"the teacher of {task.name}", "setting")
    for name, value in options.items():  # a count (of steps) is a whole number: 2.5 is refused, not cut to 2
        if isinstance(defaults[name], int) and not isinstance(defaults[name], bool):  # (a switch is 0 or 1)
            if not value.is_integer():
                raise SystemExit(f"error: {flag} {name} is a whole number, got {value:g}")
            options[name] = int(value)
    try:
        task.make_teacher(**options)
    except ValueError as error:
        raise SystemExit(f"error: {flag}: {error}") from None
    return options


class CheckpointAgent:
    """A trained model acting in one env, step by step with cached inference (rate_core.rollout):
    actions sampled from its softmax with a random stream seeded by `seed`, return-to-go from
    `target_return` minus the rewards received."""

    def __init__(self, model: MemoryTransformer, target_return: float, seed: int):
        self.policy = make_policy(model, 1)
        self.return_to_go = float(target_return)
        self.rng = np.random.default_rng([1, seed])
        self.obs_dtype = torch.uint8 if model.config.obs_kind == "image" else torch.float32

    @torch.no_grad()
    def act(self, obs) -> int:
        logits = self.policy.logits(torch.tensor([self.return_to_go]), torch.as_tensor(obs)[None].to(self.obs_dtype))
        action = sample_actions(logits.float().softmax(-1), torch.tensor([self.rng.random()]))
        self.policy.record_action(action)
        return int(action[0])

    def observe(self, reward: float) -> None:
        self.return_to_go -= float(reward)


@functools.lru_cache(maxsize=1)
def _policy_model(path: str, task_name: str) -> MemoryTransformer:
    """The behaviour checkpoint, loaded once per process."""
    return load_checkpoint(path, task=task_name)


def run_episode(task: Task, settings: dict, seed: int, teacher: bool = False,
                teacher_options: dict | None = None, policy: str | None = None, env=None) -> dict:
    """One episode of the collector's policy: observations (T, ...), actions (T,), rewards (T,), its
    return, the reset info, and with teacher=True (for a task that has a teacher, built with
    `teacher_options`) labels (T,), and where the task has an aux_label its value at every step,
    aux_labels (T,). policy: a checkpoint folder that takes the actions instead (the
    teacher, which needs teacher=True, still labels every step). env: a `task` env made with
    `settings` to play in, left open (the reset's seed fixes the episode); without one, one is made
    and closed."""
    if policy and not teacher:
        raise ValueError("a policy acts and the teacher labels its steps: give teacher=True too")
    own_env = env is None
    env = task.make_env(**settings) if own_env else env
    expert = task.make_teacher(**(teacher_options or {})) if teacher else task.make_expert()
    agent = CheckpointAgent(_policy_model(policy, task.name), task.evaluation.target_return, seed) if policy else None
    obs, info = env.reset(seed=seed)
    reset_info = dict(info)
    expert.reset(env, info)
    observations, actions, rewards, labels, aux = [], [], [], [], []
    while True:
        if task.aux_label is not None:
            aux.append(task.aux_class(info))
        if teacher:
            action, label = expert.act_and_label(env, obs, info)  # called every step: the teacher follows the game
            labels.append(label)
        else:
            action = expert.act(env, obs, info)
        if agent is not None:
            action = agent.act(obs)
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        if agent is not None:
            agent.observe(reward)
        if terminated or truncated:
            break
    if own_env:
        env.close()
    episode = {"observations": np.stack(observations), "actions": np.array(actions), "rewards": np.array(rewards),
               "return": float(np.sum(rewards)), "success": bool(info.get("success", np.sum(rewards) > 0)),
               "reset_info": reset_info}
    if teacher:
        episode["labels"] = np.array(labels)
    if task.aux_label is not None:
        episode["aux_labels"] = np.array(aux)
    return episode


_worker_env: tuple | None = None  # a worker process's (task name, settings, env), kept for its next episode


def _episode_job(task_name: str, settings: dict, seed: int, teacher: bool, teacher_options: dict | None,
                 policy: str | None) -> dict:
    """run_episode in a worker process, in the env of its previous episode where the settings are the
    same (making a Memory Maze env takes 1.3-2 s, a quarter of its 1,000-step episode)."""
    global _worker_env
    torch.set_num_threads(1)  # one process per core: the model's threads would only contend
    task = get_task(task_name)
    if _worker_env is None or _worker_env[:2] != (task_name, settings):
        if _worker_env is not None:
            _worker_env[2].close()
        _worker_env = None  # until the new one is made
        _worker_env = (task_name, settings, task.make_env(**settings))
    try:
        return run_episode(task, settings, seed, teacher, teacher_options, policy, env=_worker_env[2])
    except BaseException:  # an env that failed is not played in again
        _worker_env[2].close()
        _worker_env = None
        raise


def _close_worker_env() -> None:
    """Close a worker process's env (stop_pool ends the workers with their envs open)."""
    global _worker_env
    if _worker_env is not None:
        _worker_env[2].close()
        _worker_env = None


def _episodes(task: Task, settings: dict, first_seed: int, pool, ahead: int, teacher: bool,
              teacher_options: dict | None, policy: str | None):
    """Expert episodes with seeds first_seed, first_seed + 1, ... in order (run `ahead` at a time in
    the pool's processes when there is a pool), all of a process's in one env."""
    seed = first_seed
    if pool is None:
        env = task.make_env(**settings)
        try:
            while True:
                yield run_episode(task, settings, seed, teacher, teacher_options, policy, env=env)
                seed += 1
        finally:
            env.close()
    pending = collections.deque()
    try:
        while True:
            while len(pending) < ahead:
                pending.append(pool.submit(_episode_job, task.name, settings, seed, teacher, teacher_options, policy))
                seed += 1
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def collect(task: Task, out: Path, episodes_per_setting: int, seed: int, workers: int = 1,
            teacher: bool = False, overrides: dict | None = None, teacher_options: dict | None = None,
            policy: Path | None = None) -> Path:
    """Run the expert for `episodes_per_setting` episodes of each dataset setting (only successful
    ones when the task asks for that; seeds go on from `seed` until there are enough). Seeds are
    consumed in order, so the dataset does not depend on `workers`. teacher: run the task's teacher
    (Task.make_teacher, which must exist; built with `teacher_options`) and store its labels.
    overrides: env settings that replace those of every dataset setting. policy: a checkpoint folder
    that acts instead of the teacher (run_episode)."""
    policy = None if policy is None else str(policy)
    dataset_settings = [{**settings, **(overrides or {})} for settings in task.dataset_settings]
    returns, lengths, differing, tried, successes = [], [], 0, 0, 0
    actor = "policy" if policy else "expert"  # who acted, so whose successes are counted
    total = episodes_per_setting * len(task.dataset_settings)
    pool = worker_pool(workers, on_stop=_close_worker_env) if workers > 1 else None
    # Episodes go to disk as they come (the writer's staging folder), so memory holds only those in flight.
    with DatasetWriter(out, task.name) as writer:
        try:
            with tqdm(total=total, desc=f"collecting {task.name}", unit="episode") as progress:
                for settings in dataset_settings:
                    kept = 0
                    stream = _episodes(task, settings, seed + tried, pool, 2 * workers, teacher, teacher_options,
                                       policy)
                    while kept < episodes_per_setting:
                        if tried >= 10 * total + 100:
                            raise RuntimeError(f"the {actor} of {task.name} succeeded in only {successes} of "
                                               f"{tried} episodes")
                        episode = next(stream)
                        tried += 1
                        successes += episode["success"]
                        if task.dataset_success_only and not episode["success"]:
                            continue
                        writer.add_episode(episode)
                        returns.append(episode["return"])
                        lengths.append(len(episode["actions"]))
                        differing += int(np.sum(episode["labels"] != episode["actions"])) if teacher else 0
                        kept += 1
                        progress.update()
                    stream.close()
        finally:
            if pool is not None:
                stop_pool(pool)
        returns, lengths = np.array(returns), np.array(lengths)
        taught = task.make_teacher(**(teacher_options or {})) if teacher else None
        path = writer.close({
            "settings": dataset_settings, "episodes_per_setting": episodes_per_setting, "seed": seed,
            "expert": type(task.make_expert()).__name__,
            "teacher": type(taught).__name__ if teacher else None,
            "teacher_settings": {k: v for k, v in vars(taught).items() if isinstance(v, (int, float, tuple))}
            if teacher else None,
            "policy": policy,
            "labelled_steps_differing": float(differing / lengths.sum()) if teacher else 0.0,
            "mean_return": float(returns.mean()),
            f"{actor}_episodes_run": tried, f"{actor}_success_rate": successes / tried,
            "success_only": task.dataset_success_only, "mean_length": float(lengths.mean()),
        })
    succeeded = f"; the {actor} succeeded in {successes} of {tried} episodes" \
        if task.evaluation.metric == "success" or task.dataset_success_only else ""  # return tasks: no success
    print(f"wrote {len(lengths)} episodes ({lengths.sum():,} steps, mean length {lengths.mean():.1f}, mean return "
          f"{returns.mean():.3f}) to {path}{succeeded}")
    return path


def main(args: Args) -> None:
    task = task_or_exit(args.task)
    out = args.out or Path("data") / task.name / "expert"
    try:  # before any episode: collect replaces the folder at the end
        check_replaceable(out, "meta.json", "dataset", own=DATASET_FILES)
    except ValueError as error:
        raise SystemExit(f"error: --out {error}") from None
    folder_out_or_exit("--out", out)
    seed = task.dataset_seed if args.seed is None else args.seed
    at_least("--seed", seed, 0)
    at_least("--workers", args.workers, 1)
    episodes = task.dataset_episodes if args.episodes is None else args.episodes
    at_least("--episodes", episodes, 1)
    overrides = parse_settings(task, args.settings)
    check_env_settings(task, [{**settings, **overrides} for settings in task.dataset_settings], "--settings")
    if args.teacher and task.make_teacher is None:
        raise SystemExit(f"error: task {task.name} has no teacher; collect without --teacher")
    if args.teacher_options and not args.teacher:
        raise SystemExit("error: --teacher-options set the teacher's behaviour; add --teacher")
    if args.policy is not None:
        if not args.teacher:
            raise SystemExit("error: --policy acts and the teacher labels its steps; add --teacher")
        try:  # here, before any worker starts: a bad checkpoint is one clear error
            _policy_model(str(args.policy), task.name)
        except CheckpointError as error:
            raise SystemExit(f"error: --policy: {error}") from error
    collect(task, out, episodes, seed, args.workers, args.teacher, overrides,
            parse_teacher_options(task, args.teacher_options), args.policy)


if __name__ == "__main__":
    run_main(main, cli(Args), "interrupted: nothing written (a dataset is put in place only when complete)")
