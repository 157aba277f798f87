"""Many single gymnasium envs stepped together, for the rollout engine and the collector.

Unlike gymnasium's SyncVectorEnv, an env that has finished is not stepped again (no autoreset, no
wasted simulation): until the next reset it keeps returning its last observation, reward 0 and
terminated/truncated False. Info values that are numbers or booleans become arrays of shape
(num_envs,) (the last value for finished envs).
"""

import contextlib
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space


def check_reset_options(options: dict | None) -> None:
    """ValueError for gymnasium's partial reset (options["reset_mask"]): these vector envs reset every env."""
    if options and "reset_mask" in options:
        raise ValueError("reset_mask is not supported: reset() resets every env (a finished env waits for it)")


def check_actions(space, actions: np.ndarray, active: np.ndarray) -> None:
    """ValueError before any env steps if an active env's action is not in its action space (`space`),
    so that a bad action does not leave some envs stepped and others not."""
    for i in np.flatnonzero(active):
        if not space.contains(actions[i]):
            raise ValueError(f"env {i}: invalid action {actions[i].tolist()!r} for the action space {space}")


def env_seeds(seed: int | list[int] | None, num_envs: int) -> list[int | None]:
    """One seed per env from a vector env's reset(seed=...): an int (env i gets seed + i, as
    gymnasium's vector envs do), one seed per env, or None."""
    if seed is None:
        return [None] * num_envs
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(num_envs)]
    seeds = [None if s is None else int(s) for s in seed]
    if len(seeds) != num_envs:
        raise ValueError(f"got {len(seeds)} seeds for {num_envs} envs")
    return seeds


def close_envs(envs: list[gym.Env]) -> None:
    """Close each of `envs`, every one even if some fail to close; the first failure is raised after."""
    failure = None
    for env in envs:
        try:
            env.close()
        except Exception as error:
            failure = failure or error
    if failure is not None:
        raise failure


class LockstepVectorEnv(VectorEnv):
    """`len(env_fns)` envs made by the given callables, stepped in lockstep (see the module docstring)."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]]):
        if not env_fns:
            raise ValueError("need at least one env")
        self.envs = []
        try:
            for make in env_fns:
                self.envs.append(make())
        except BaseException:  # an env that fails to be made (or Ctrl-C, or a worker's SIGTERM) closes those made
            with contextlib.suppress(Exception):  # the failure to make one is the error to see
                close_envs(self.envs)
            raise
        first = self.envs[0]
        self.num_envs = len(self.envs)
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.render_mode = first.render_mode
        self.metadata = {**first.metadata, "autoreset_mode": AutoresetMode.DISABLED}
        self._obs = [None] * self.num_envs
        self._info: list[dict] = [{} for _ in range(self.num_envs)]
        self.done = np.ones(self.num_envs, dtype=bool)

    def _infos(self) -> dict[str, np.ndarray]:
        """Scalar info values (numbers and strings, e.g. Memory Maze's target_bearing) as (num_envs,)
        arrays; an env without the key gives 0 (a string key: "")."""
        blank = {}
        for info in self._info:
            for k, v in info.items():
                if isinstance(v, (str, np.str_)):
                    blank[k] = ""
                elif isinstance(v, (bool, int, float, np.number, np.bool_)):
                    blank.setdefault(k, 0)
        return {k: np.array([info.get(k, blank[k]) for info in self._info]) for k in sorted(blank)}

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """seed: an int (env i gets seed + i), one seed per env, or None."""
        check_reset_options(options)
        seeds = env_seeds(seed, self.num_envs)
        for i, (env, s) in enumerate(zip(self.envs, seeds, strict=True)):
            self._obs[i], self._info[i] = env.reset(seed=s, options=options)
        self.done[:] = False
        return np.stack(self._obs), self._infos()

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        actions = np.asarray(actions)
        if actions.shape[:1] != (self.num_envs,):
            raise ValueError(f"expected {self.num_envs} actions, got an array of shape {actions.shape}")
        if any(obs is None for obs in self._obs):
            raise RuntimeError("call reset() before step()")
        reward = np.zeros(self.num_envs)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        check_actions(self.single_action_space, actions, ~self.done)
        for i in np.flatnonzero(~self.done):  # an env failing here leaves those before it stepped, and marked done
            self._obs[i], reward[i], terminated[i], truncated[i], self._info[i] = self.envs[i].step(actions[i])
            self.done[i] = terminated[i] or truncated[i]
        return np.stack(self._obs), reward, terminated, truncated, self._infos()

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode != "rgb_array":
            return None
        return tuple(env.render() for env in self.envs)

    def close_extras(self, **kwargs) -> None:
        close_envs(self.envs)
