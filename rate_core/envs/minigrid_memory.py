"""Minigrid-Memory: see an object in the start room, walk a long hallway, go to the matching object.

Built on minigrid 3.x `MemoryEnv` (the grid size is its constructor argument):

    +-----+----------------------------+-+
    |cue  |                            |o|   o: a key and a ball at the two ends of the split
    |  @ ->  hallway ----------------->  |   @: the agent, starting anywhere on the middle row
    |     |                            |o|
    +-----+----------------------------+-+

Observation: uint8 (3, 84, 84): the 3x3 cells in front of the agent (it sees two cells ahead and
one to each side), rendered at 28 pixels per cell, channels first.
Actions: 0 = turn left, 1 = turn right, 2 = forward.
Reward: minigrid's 1 - 0.9 * step_count / max_steps (max_steps = 5 * size^2) for reaching the
object that matches the cue, 0 for the other one.
Start: the agent on the middle row at a random x between the start room and the hallway's end,
facing east; the cue (key or ball) at the start room's north wall.
End: terminated next to either object; truncated after `step_cap` steps or minigrid's max_steps,
whichever comes first (`episode_limit`).
info: cue (0 = key, 1 = ball), success.
"""

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rate_core.envs import action_index, probability

VIEW_TILE = 28
ACTIONS = ("left", "right", "forward")
CUE_TYPES = ("key", "ball")
FRAME_PIXELS = 480  # the map in a video frame is at most about this wide
MAP_ROWS = 5  # a frame's map: the hallway's row and two on each side (walls, the cue and the two objects)
CLOSE_UP_TILE = 16  # a map with smaller cells gets a close-up of the agent's surroundings at this size
VIEW_ZOOM, VIEW_GAP = 2, 8  # the agent's view beside the map in render(): 2x, after an 8-pixel gap


def episode_limit(size: int, step_cap: int) -> int:
    """The most steps an episode lasts: step_cap, or minigrid's own limit (5 size^2) where it is lower."""
    return min(step_cap, 5 * size**2)


class MinigridMemoryEnv(gym.Env):
    """Minigrid-Memory on a size x size grid (odd size >= 7), see the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, size: int = 41, step_cap: int = 500, render_mode: str | None = None):
        from minigrid.envs import MemoryEnv

        if size < 7 or size % 2 == 0:
            raise ValueError(f"size must be odd and at least 7, got {size}")
        if step_cap < 1:
            raise ValueError(f"step_cap must be positive, got {step_cap}")
        self.size, self.step_cap, self.render_mode = size, step_cap, render_mode
        self.grid_env = MemoryEnv(size=size, agent_view_size=3)
        self.observation_space = spaces.Box(0, 255, shape=(3, 3 * VIEW_TILE, 3 * VIEW_TILE), dtype=np.uint8)
        self.action_space = spaces.Discrete(len(ACTIONS))
        self._steps = 0
        self._cue = 0
        self._background = None
        self._over = True

    def _observation(self) -> np.ndarray:
        return np.ascontiguousarray(self.grid_env.get_pov_render(VIEW_TILE).transpose(2, 0, 1))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.grid_env.reset(seed=seed)
        self._background = None
        self._steps = 0
        self._over = False
        cue = self.grid_env.grid.get(1, self.size // 2 - 1)
        self._cue = CUE_TYPES.index(cue.type)
        return self._observation(), {"cue": self._cue}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = action_index(action, len(ACTIONS), "Minigrid-Memory", "0 (left), 1 (right) or 2 (forward)")
        if self._over:
            raise RuntimeError("this Minigrid-Memory episode is over; call reset() first")
        _, reward, terminated, out_of_time, _ = self.grid_env.step(action)
        self._steps += 1
        # minigrid's own limit (max_steps = 5 * size**2) ends the episode too: past it, its reward for the
        # right object would go below 0 (on grids of 7 and 9, whose limits of 245 and 405 are below step_cap)
        truncated = not terminated and (out_of_time or self._steps >= self.step_cap)
        self._over = bool(terminated) or truncated
        return self._observation(), float(reward), bool(terminated), truncated, {
            "cue": self._cue, "success": bool(terminated and reward > 0)}

    def render(self) -> np.ndarray | None:
        """A video frame: the map, cut to the MAP_ROWS rows around the hallway (every other row of
        the grid is out of reach), the agent's 3x3 view highlighted, and what the agent sees beside
        it, twice the observation's size. Where the map's cells are smaller than CLOSE_UP_TILE
        pixels (a grid of 31 cells or more), a close-up that follows the agent sits above the map
        (a player's label over a video's top-left corner hides no part of the map then), and two
        yellow lines on the map mark where it is. Walls and objects never move in this
        task, so they are drawn once per episode and each frame only adds the view and the agent."""
        if self.render_mode != "rgb_array":
            return None
        tile = max(3, FRAME_PIXELS // self.size)
        top = self.size // 2 - MAP_ROWS // 2
        if self._background is None:
            strip = self.grid_env.grid.slice(0, top, self.size, MAP_ROWS)
            self._background = [strip.render(tile, agent_pos=(-1, -1))]
            if tile < CLOSE_UP_TILE:
                self._background.append(strip.render(CLOSE_UP_TILE, agent_pos=(-1, -1)))
        overview = self._painted(self._background[0], tile, top)
        blocks = [overview]
        if len(self._background) > 1:
            cells = min(self.size, overview.shape[1] // CLOSE_UP_TILE)
            left = min(max(int(self.grid_env.agent_pos[0]) - cells // 2, 0), self.size - cells)
            close_up = self._painted(self._background[1], CLOSE_UP_TILE, top)
            blocks.insert(0, close_up[:, left * CLOSE_UP_TILE:(left + cells) * CLOSE_UP_TILE])
            for x in (left * tile, (left + cells) * tile - 1):  # where the close-up is, on the map
                overview[:, x] = (250, 210, 40)
        view = self._observation().transpose(1, 2, 0).repeat(VIEW_ZOOM, 0).repeat(VIEW_ZOOM, 1)
        width = max(block.shape[1] for block in blocks)
        height = max(view.shape[0], sum(block.shape[0] for block in blocks) + VIEW_GAP * (len(blocks) - 1))
        frame = np.full((height, width + VIEW_GAP + view.shape[1], 3), 30, dtype=np.uint8)
        frame[:view.shape[0], -view.shape[1]:] = view
        y = 0
        for block in blocks:
            frame[y:y + block.shape[0], :block.shape[1]] = block
            y += block.shape[0] + VIEW_GAP
        return frame

    def _painted(self, background: np.ndarray, tile: int, top: int) -> np.ndarray:
        """A copy of a map strip (grid rows from `top`, `tile` pixels per cell) with the cells the
        agent sees lightened, as minigrid highlights them, and the agent drawn."""
        from minigrid.core.grid import Grid

        image = background.copy()
        env = self.grid_env
        for i in range(3):
            for j in range(3):
                x, y = env.agent_pos + env.dir_vec * j + env.right_vec * (i - 1)
                if 0 <= x < self.size and 0 <= y - top < MAP_ROWS:
                    cell = image[(y - top) * tile:(y - top + 1) * tile, x * tile:(x + 1) * tile]
                    cell += ((255 - cell) * 0.3).astype(np.uint8)
        x, y = env.agent_pos
        image[(y - top) * tile:(y - top + 1) * tile, x * tile:(x + 1) * tile] = Grid.render_tile(
            None, agent_dir=env.agent_dir, highlight=True, tile_size=tile)
        return image

    # Privileged state, for the expert.
    @property
    def agent_pos(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.grid_env.agent_pos)

    @property
    def agent_dir(self) -> int:
        return int(self.grid_env.agent_dir)

    @property
    def success_pos(self) -> tuple[int, int]:
        return tuple(self.grid_env.success_pos)

    @property
    def failure_pos(self) -> tuple[int, int]:
        return tuple(self.grid_env.failure_pos)

    @property
    def cue_pos(self) -> tuple[int, int]:
        return 1, self.size // 2 - 1

    def cue_in_view(self) -> bool:
        return bool(self.grid_env.in_view(*self.cue_pos))

    def free(self, x: int, y: int) -> bool:
        """Whether the agent can stand on cell (x, y)."""
        cell = self.grid_env.grid.get(x, y)
        return cell is None or cell.can_overlap()


_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # minigrid's agent_dir: 0 east, 1 south, 2 west, 3 north


class MinigridMemoryExpert:
    """Plans on the privileged grid, but acts on what an agent can know: first it makes sure the cue
    has been in its 3x3 view, then walks (shortest path) to the junction at the end of the hallway
    and turns to one side (north for a key cue, south for a ball) until that side's object is in
    view; it walks to it if it matches the cue, else turns around to the other one. (Walking
    straight to the right side would need the privileged answer: from the junction the objects are
    out of view.)
    Randomness for diverse data: a few random turns or steps at the start, and with probability
    `noise` per step a random action that the planner then recovers from; all drawn from the
    episode's seed."""

    def __init__(self, noise: float = 0.05, wander: int = 4, look_by_cue: float = 1.0):
        self.noise, self.look_by_cue = probability("noise", noise), probability("look_by_cue", look_by_cue)
        if wander < 0:
            raise ValueError(f"wander is a number of steps, 0 or more, got {wander}")
        self.wander = wander

    def reset(self, env: MinigridMemoryEnv, info: dict) -> None:
        # the episode's seed fixes the expert's randomness too (env.np_random is seeded by reset)
        self.rng = np.random.default_rng(env.np_random.integers(2**63))
        self.seen_cue = env.cue_in_view()
        self.looked = False
        # Which side to look at first: north for a key, south for a ball. Any order is fair play once
        # the cue was seen; tying it to the cue gives the data a choice that depends on the cue alone.
        # With a random side, the only cue-dependent action is the XOR at the look pose (go if the
        # seen object matches the cue), and models trained on that data stayed at chance: nothing
        # pulls the cue into their context until they already compute the XOR. (With the rule kept
        # 80% of the time, a model learnt the rule and then the look-pose choice from its own turn,
        # right only when the rule was kept.)
        preferred = 3 if info["cue"] == 0 else 1  # minigrid's agent_dir: 3 north, 1 south
        self.look_dir = preferred if self.rng.random() < self.look_by_cue else 4 - preferred
        self.blocked = set()
        self.wander_left = int(self.rng.integers(0, self.wander + 1))

    def act(self, env: MinigridMemoryEnv, obs, info) -> int:
        self.seen_cue = self.seen_cue or env.cue_in_view()
        junction = (env.success_pos[0], env.size // 2)
        self.looked = self.looked or (self.seen_cue and (*env.agent_pos, env.agent_dir) == (*junction, self.look_dir))
        # cells that end the episode: the wrong object always, the right one until it was looked at
        self.blocked = {env.failure_pos} | (set() if self.looked else {env.success_pos})
        if self.wander_left > 0 or self.rng.random() < self.noise:
            self.wander_left = max(0, self.wander_left - 1)
            action = int(self.rng.integers(len(ACTIONS)))
            if action == 2 and self._ahead(env) in self.blocked:
                action = int(self.rng.integers(2))  # turn instead of ending the episode by chance
            return action
        if not self.seen_cue:
            # Stand two cells east of the cue's column on the middle row, facing west: the cue is
            # then in the view's front-right corner.
            return self._toward(env, [((3, env.size // 2), 2), ((2, env.size // 2), 2), ((1, env.size // 2), 3)])
        if not self.looked:
            return self._toward(env, [(junction, self.look_dir)])
        return self._toward(env, [(env.success_pos, d) for d in range(4)])

    @staticmethod
    def _ahead(env: MinigridMemoryEnv) -> tuple[int, int]:
        x, y = env.agent_pos
        dx, dy = _DIRECTIONS[env.agent_dir]
        return x + dx, y + dy

    def _toward(self, env: MinigridMemoryEnv, targets: list[tuple[tuple[int, int], int]]) -> int:
        """The first action of a shortest (x, y, dir) path to any of the target poses."""
        start = (*env.agent_pos, env.agent_dir)
        wanted = {(x, y, d) for (x, y), d in targets}
        if start in wanted:
            return 2  # already there: step forward (into the goal cell, or harmlessly)
        first = {start: None}
        frontier = [start]
        while frontier:
            next_frontier = []
            for state in frontier:
                x, y, d = state
                moves = [(0, (x, y, (d - 1) % 4)), (1, (x, y, (d + 1) % 4))]
                dx, dy = _DIRECTIONS[d]
                ahead = (x + dx, y + dy)
                if env.free(*ahead) and (ahead not in self.blocked or any(ahead == t[:2] for t in wanted)):
                    moves.append((2, (*ahead, d)))
                for action, nxt in moves:
                    if nxt in first:
                        continue
                    first[nxt] = action if first[state] is None else first[state]
                    if nxt in wanted:
                        return first[nxt]
                    next_frontier.append(nxt)
            frontier = next_frontier
        return 0
