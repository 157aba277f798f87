"""Passive T-Maze: remember a cue shown once, act on it at the end of a long corridor.

    x = 0                                   x = L (junction)
    [start] -> -> -> ... corridor ... -> -> [J] -- (L, +1) goal if cue = +1
                                             |
                                            (L, -1) goal if cue = -1

Observation: float32 [y, cue, flag, noise]. `cue` is the goal side (+1 or -1) in the first
observation only and 0 afterwards; `flag` is 1 at the junction; `noise` is drawn uniformly from
{-1, 0, 1} at every step (a distractor).
Actions: 0 = +x, 1 = +y, 2 = -x, 3 = -y. A move off the corridor leaves the agent in place.
Reward: 1 when the agent turns from the junction to the cued side, 0 otherwise.
Start: (0, 0). The cue side is drawn at reset.
End: terminated when the agent turns at the junction (either side); truncated after `episode_length`
steps. The corridor is L = episode_length - 2 long, so the shortest episode takes
episode_length - 1 steps.

`TMazeEnv` is the gymnasium environment; `TMazeVectorEnv` steps many of them as numpy arrays and,
for the same seeds, produces exactly the same transitions.
"""

import functools
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rate_core.envs import action_index

FORWARD, UP, BACK, DOWN = 0, 1, 2, 3
_MOVES = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.int64)  # (dx, dy) per action
OBSERVATION_SPACE = spaces.Box(low=-1.0, high=1.0, shape=(4,), dtype=np.float32)
MIN_EPISODE_LENGTH = 3


FRAME_SIZE = (640, 176)  # width, height of rendered frames
_VISIBLE_CELLS = 160  # longer corridors are drawn as a window that follows the agent


def render_frame(x: int, y: int, corridor_length: int, cue: int, t: int) -> np.ndarray:
    """(H, W, 3) uint8 picture of a T-Maze: the corridor from the start (left) to the junction
    (right) with its two arms, the cue drawn at the start cell while it is shown (t = 0) and as a
    small reminder above the start afterwards, the agent as an orange disc. An arm the agent
    turned into turns green (the cued side) or red."""
    from PIL import ImageDraw

    cells = corridor_length + 1
    first = 0 if cells <= _VISIBLE_CELLS else int(np.clip(x - _VISIBLE_CELLS // 2, 0, cells - _VISIBLE_CELLS))
    image = _background(corridor_length, cue, first, t == 0, y).copy()
    layout = _Layout(corridor_length, first)
    if first <= x < first + layout.shown:
        left, top, right, bottom = layout.box(x, y)
        cx, cy, radius = (left + right) / 2, (top + bottom) / 2, max(8.0, min(layout.cell, layout.row_h) * 0.35)
        ImageDraw.Draw(image).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(255, 150, 30))
    return np.asarray(image)


class _Layout:
    """Where the cells of a (window of a) corridor are drawn."""

    margin, row_h = 24, 32.0

    def __init__(self, corridor_length: int, first: int):
        self.first = first
        self.shown = min(corridor_length + 1, _VISIBLE_CELLS)
        self.cell = min(40.0, (FRAME_SIZE[0] - 2 * self.margin - 20) / self.shown)
        self.mid = FRAME_SIZE[1] / 2

    def box(self, cx: int, cy: int) -> tuple[float, float, float, float]:
        left = self.margin + (cx - self.first) * self.cell
        top = self.mid - self.row_h / 2 - cy * self.row_h
        return left + 1, top + 1, left + self.cell - 1, top + self.row_h - 1


@functools.lru_cache(maxsize=256)
def _background(corridor_length: int, cue: int, first: int, cue_shown: bool, y: int):
    """Everything of a frame but the agent (a PIL image; frames of an episode share a few)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    width, height = FRAME_SIZE
    image = Image.new("RGB", FRAME_SIZE, (30, 33, 40))
    draw = ImageDraw.Draw(image)
    layout = _Layout(corridor_length, first)
    box, mid, row_h = layout.box, layout.mid, layout.row_h
    cue_colour = (80, 160, 255) if cue > 0 else (230, 120, 255)
    for cx in range(first, first + layout.shown):
        draw.rectangle(box(cx, 0), fill=(200, 200, 200) if cx else cue_colour)
    if first + layout.shown - 1 == corridor_length:
        jl, _, jr, _ = box(corridor_length, 0)
        arm_width = max(jr - jl, 20.0)  # arms stay visible however thin the corridor cells are
        centre = (jl + jr) / 2
        for arm in (1, -1):
            _, top, _, bottom = box(corridor_length, arm)
            colour = (120, 120, 120)
            if y == arm:
                colour = (60, 200, 90) if arm == cue else (230, 70, 60)
            draw.rectangle((centre - arm_width / 2, top, centre + arm_width / 2, bottom), fill=colour,
                           outline=(255, 255, 255) if arm == cue else None, width=2)
        draw.text((width - 4, height - 20), "junction: turn up or down", fill=(220, 220, 220), font=font, anchor="ra")
    if first == 0:
        side = "UP" if cue > 0 else "DOWN"
        draw.text((box(0, 0)[0], mid - 1.5 * row_h - 18),
                  f"cue: {side}" + (" (shown now)" if cue_shown else " (shown at step 0 only)"),
                  fill=cue_colour, font=font)
    else:
        draw.text((4, mid - 1.5 * row_h - 18), f"<- start and cue: {first} cells left of this view",
                  fill=(220, 220, 220), font=font)
    return image


def _draw_episode(rng: np.random.Generator, episode_length: int) -> tuple[int, np.ndarray]:
    """The random content of one episode: the cue side and the noise of every observation."""
    cue = 1 if rng.integers(2) else -1
    noise = rng.integers(-1, 2, size=episode_length + 1).astype(np.float32)
    return cue, noise


class TMazeEnv(gym.Env):
    """Passive T-Maze with episodes of `episode_length` steps (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, episode_length: int = 150, render_mode: str | None = None):
        if episode_length < MIN_EPISODE_LENGTH:
            raise ValueError(f"episode_length must be at least {MIN_EPISODE_LENGTH}, got {episode_length}")
        self.episode_length = episode_length
        self.corridor_length = episode_length - 2
        self.render_mode = render_mode
        self.observation_space = OBSERVATION_SPACE
        self.action_space = spaces.Discrete(4)
        self._position = np.zeros(2, dtype=np.int64)
        self._cue, self._noise, self._t = 1, np.zeros(episode_length + 1, dtype=np.float32), 0
        self._over = True

    def _observation(self) -> np.ndarray:
        x, y = self._position
        cue = self._cue if self._t == 0 else 0
        at_junction = float(x == self.corridor_length and y == 0)
        return np.array([y, cue, at_junction, self._noise[self._t]], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._cue, self._noise = _draw_episode(self.np_random, self.episode_length)
        self._position[:] = 0
        self._t = 0
        self._over = False
        return self._observation(), {"cue": self._cue}

    def step(self, action):
        action = action_index(action, 4, "T-Maze", "0 (+x), 1 (+y), 2 (-x) or 3 (-y)")
        if self._over:
            raise RuntimeError("this T-Maze episode is over; call reset() first")
        x, y = self._position
        dx, dy = _MOVES[action]
        terminated = False
        reward = 0.0
        if dy == 0:
            if 0 <= x + dx <= self.corridor_length:
                self._position[0] = x + dx
        elif x == self.corridor_length:  # turning is only possible at the junction, and ends the episode
            self._position[1] = dy
            terminated = True
            reward = float(dy == self._cue)
        self._t += 1
        truncated = not terminated and self._t >= self.episode_length
        self._over = terminated or truncated
        info = {"cue": self._cue, "success": reward > 0}
        return self._observation(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return render_frame(int(self._position[0]), int(self._position[1]), self.corridor_length, self._cue, self._t)


class TMazeVectorEnv(VectorEnv):
    """`num_envs` T-Mazes stepped as arrays. Envs do not reset by themselves (autoreset disabled):
    a finished env keeps returning its last observation with zero reward until `reset`."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30, "autoreset_mode": AutoresetMode.DISABLED}

    def __init__(self, num_envs: int, episode_length: int = 150, render_mode: str | None = None):
        self.render_mode = render_mode
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1, got {num_envs}")
        if episode_length < MIN_EPISODE_LENGTH:
            raise ValueError(f"episode_length must be at least {MIN_EPISODE_LENGTH}, got {episode_length}")
        self.num_envs = num_envs
        self.episode_length = episode_length
        self.corridor_length = episode_length - 2
        self.single_observation_space = OBSERVATION_SPACE
        self.single_action_space = spaces.Discrete(4)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.position = np.zeros((num_envs, 2), dtype=np.int64)
        self.cue = np.ones(num_envs, dtype=np.int64)
        self.noise = np.zeros((num_envs, episode_length + 1), dtype=np.float32)
        self.t = np.zeros(num_envs, dtype=np.int64)
        self.done = np.zeros(num_envs, dtype=bool)
        self._reset_once = False
        self._rngs = [gym.utils.seeding.np_random()[0] for _ in range(num_envs)]  # as TMazeEnv's np_random

    def _observations(self) -> np.ndarray:
        rows = np.arange(self.num_envs)
        obs = np.zeros((self.num_envs, 4), dtype=np.float32)
        obs[:, 0] = self.position[:, 1]
        obs[:, 1] = np.where(self.t == 0, self.cue, 0)
        obs[:, 2] = (self.position[:, 0] == self.corridor_length) & (self.position[:, 1] == 0)
        obs[:, 3] = self.noise[rows, np.minimum(self.t, self.episode_length)]
        return obs

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """seed: an int (env i gets seed + i, as gymnasium's vector envs do) or one seed per env; an env
        given no seed draws its episode from its generator, as TMazeEnv does (the same episodes)."""
        from rate_core.envs.lockstep import check_reset_options, env_seeds

        check_reset_options(options)
        for i, s in enumerate(env_seeds(seed, self.num_envs)):
            if s is not None:
                self._rngs[i], _ = gym.utils.seeding.np_random(s)
            self.cue[i], self.noise[i] = _draw_episode(self._rngs[i], self.episode_length)
        self.position[:] = 0
        self.t[:] = 0
        self.done[:] = False
        self._reset_once = True
        return self._observations(), {"cue": self.cue.copy()}

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        actions = np.asarray(actions)
        active = ~self.done
        if actions.shape != (self.num_envs,) or not np.issubdtype(actions.dtype, np.integer) \
                or ((active & ((actions < 0) | (actions > 3))).any()):
            raise ValueError(f"expected {self.num_envs} whole-number actions in 0..3, got {actions!r}")
        if not self._reset_once:
            raise RuntimeError("call reset() before step()")
        actions = np.where(active, actions, 0).astype(np.int64)  # a finished env's action is ignored
        move = _MOVES[actions]
        along = active & (move[:, 1] == 0)
        new_x = self.position[:, 0] + move[:, 0]
        inside = (new_x >= 0) & (new_x <= self.corridor_length)
        self.position[along & inside, 0] = new_x[along & inside]
        turning = active & (move[:, 1] != 0) & (self.position[:, 0] == self.corridor_length)
        self.position[turning, 1] = move[turning, 1]
        reward = (turning & (move[:, 1] == self.cue)).astype(np.float32)
        self.t[active] += 1
        terminated = turning
        truncated = active & ~turning & (self.t >= self.episode_length)
        self.done |= terminated | truncated
        info = {"cue": self.cue.copy(), "success": reward > 0, "active": active}
        return self._observations(), reward, terminated, truncated, info

    def render(self) -> tuple[np.ndarray, ...] | None:
        """One frame per env (render_mode 'rgb_array'), as gymnasium's vector envs return them."""
        if self.render_mode != "rgb_array":
            return None
        return tuple(render_frame(int(x), int(y), self.corridor_length, int(c), int(t))
                     for (x, y), c, t in zip(self.position, self.cue, self.t, strict=True))
