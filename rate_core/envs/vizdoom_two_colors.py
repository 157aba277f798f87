"""ViZDoom-Two-Colors: see the colour of a pillar, then collect items of that colour in a room whose
floor burns, long after the pillar has gone.

    +--------------------------------+
    |   g       r          g         |   a 1280 x 1280 room; the floor costs 8 HP every 32 tics
    |       r        #         r     |   #: a red or green pillar, there for the first 45 steps
    |  g          ^      g           |   g, r: green and red items (10 + 10, then one every 15 steps)
    |     r       @            g     |   @: the player, 320 units south of the centre, facing it
    +--------------------------------+

Observation: uint8 (3, 64, 112): the 320x180 screen resized with cv2.INTER_AREA, channels first.
Actions: 0 = turn left, 1 = turn right, 2 = forward, 3 = left + forward, 4 = right + forward; each
held for 2 tics (frame skip 2).
Reward: 0.02 per step (ViZDoom's living reward, 0.01 per tic) + 1.0 when health rose this step
(an item of the pillar's colour: +25 HP up to 100). An item of the other colour costs 17 HP (green)
or 13 HP (red) and gives no reward.
Start: health 92 at the first observation (the floor hurts at tic 0 too); the pillar's colour is
drawn by the engine's RNG, so a seed fixes the whole episode.
End: terminated when the player dies (ViZDoom gives no frame then: the last observation is
repeated); truncated after `step_cap` steps.
info: is_red (1 when the pillar is red), health.

The scenario (map and scripts) is built by rate_core.scenario.two_colors. `TwoColorsExpert` reads
the items' positions from the game (ViZDoom's objects info) and walks to the nearest item of the
right colour on screen; `make_vector_env` steps many envs in lockstep for the rollout engine.
"""

import math
import weakref
from contextlib import contextmanager

import cv2
import gymnasium as gym
import numpy as np
import vizdoom as vzd
from gymnasium import spaces

from rate_core.envs import action_index, probability
from rate_core.envs.lockstep import LockstepVectorEnv
from rate_core.scenario import two_colors

FRAME_SKIP = 2
OBS_SHAPE = (3, 64, 112)
_OBS_SIZE = (OBS_SHAPE[2], OBS_SHAPE[1])  # width, height, as cv2 takes them
ACTIONS = ("left", "right", "forward", "left+fwd", "right+fwd")
# Pressed buttons per action, in the config's order: TURN_LEFT, TURN_RIGHT, MOVE_FORWARD, MOVE_BACKWARD.
_BUTTONS = ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 1, 0])
HEALTH_BONUS = 1.0
SCREEN_SHAPE = (180, 320, 3)  # the config's RES_320X180 in RGB24: what render() gives
_HEALTH = two_colors.GAME_VARIABLES.index("HEALTH")
_IS_RED = two_colors.GAME_VARIABLES.index("USER2")
CUES = (0, 1, 2)  # none, every frame, while the pillar stands (TwoColorsEnv)
CUE_SIZE = (8, 16)  # rows, columns of the oracle cue's patch (cue=1)
CUE_RED, CUE_GREEN = np.array([220, 0, 0], dtype=np.uint8), np.array([0, 220, 0], dtype=np.uint8)
_ENGINE_ERRORS = (vzd.ViZDoomUnexpectedExitException, vzd.ViZDoomErrorException, vzd.ViZDoomIsNotRunningException,
                  vzd.MessageQueueException, vzd.SharedMemoryException)


class GameCrashedError(RuntimeError):
    """The ViZDoom process behind an env stopped or failed; the env is closed and cannot go on."""


_OPEN_ENVS = weakref.WeakSet()  # this process's envs whose ViZDoom game may be running (close_all)


def close_all() -> None:
    """Close every Two-Colors env of this process, those still being made included: a process about to
    end (a tool's worker stopped by SIGTERM) calls it so that no ViZDoom engine outlives it. An engine
    left running also keeps open the pipe by which a process pool sees its worker end, and the pool's
    owner then hung at exit."""
    for env in list(_OPEN_ENVS):
        env.close()


class TwoColorsEnv(gym.Env):
    """ViZDoom-Two-Colors with episodes of at most `step_cap` steps (see the module docstring).

    render_mode "rgb_array": render() gives the 320x180 RGB screen (H, W, 3) of the current step.
    cue=1: the oracle cue (the paper's "oracle-cue DT"): every observation carries the pillar's
    colour as a solid CUE_SIZE patch in its top-left corner, so no memory is needed; a diagnostic.
    cue=2: the same patch, only while the pillar stands (the first 45 steps): the colour is as easy
    to see as with cue=1 and must be remembered as without a cue; a diagnostic that separates
    reading the pillar from remembering it.
    Each env runs its own ViZDoom process (window hidden, sound off); close() ends it.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 35 / FRAME_SKIP}

    def __init__(self, step_cap: int = 2100, render_mode: str | None = None, cue: int = 0):
        if cue not in CUES:
            raise ValueError(f"cue must be 0 (none), 1 (every frame) or 2 (while the pillar stands), got {cue!r}")
        if step_cap < 1:
            raise ValueError(f"step_cap must be positive, got {step_cap}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.step_cap = step_cap
        self.render_mode = render_mode
        self.cue = cue
        self.observation_space = spaces.Box(0, 255, shape=OBS_SHAPE, dtype=np.uint8)
        self.action_space = spaces.Discrete(len(ACTIONS))
        config = two_colors.scenario_config()
        self.game = vzd.DoomGame()
        _OPEN_ENVS.add(self)  # before init() starts the engine, so that close_all finds it from then on
        self.game.load_config(str(config))
        # Keep the engine's settings file next to the scenario, not in the working directory.
        self.game.set_doom_config_path(str(config.parent / "_vizdoom.ini"))
        self.game.set_objects_info_enabled(True)  # for the expert; costs little
        with self._engine("init()"):
            self.game.init()
        self._state = None  # the game state of the current step (None once the episode is over)
        self._screen = np.zeros(SCREEN_SHAPE, dtype=np.uint8)
        self._obs = np.zeros(OBS_SHAPE, dtype=np.uint8)
        self._health = 0
        self._is_red = 0
        self._steps = 0
        self._over = True

    @contextmanager
    def _engine(self, doing: str):
        """Turn ViZDoom's exceptions into GameCrashedError naming what the env was doing."""
        try:
            yield
        except _ENGINE_ERRORS as error:
            self.close()
            what = f"{type(error).__name__}: {str(error).rstrip('.')}"
            raise GameCrashedError(f"the ViZDoom game of this Two-Colors env stopped during {doing}: {what}. "
                                   "The env is closed; make a new one.") from error

    def _read_state(self) -> None:
        self._state = self.game.get_state()
        self._screen = self._state.screen_buffer
        self._obs = np.ascontiguousarray(
            cv2.resize(self._screen, _OBS_SIZE, interpolation=cv2.INTER_AREA).transpose(2, 0, 1))
        self._health = int(self._state.game_variables[_HEALTH])
        if self.cue == 1 or (self.cue == 2 and self._pillar_stands()):
            red = int(self._state.game_variables[_IS_RED])
            self._obs[:, :CUE_SIZE[0], :CUE_SIZE[1]] = (CUE_RED if red else CUE_GREEN)[:, None, None]

    def _pillar_stands(self) -> bool:
        return any(thing.name in (two_colors.GREEN_PILLAR, two_colors.RED_PILLAR) for thing in self._state.objects)

    def _info(self) -> dict:
        return {"is_red": self._is_red, "health": self._health}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """seed: ViZDoom's seed (0 <= seed < 2**32) for this episode; without one, the next seed is
        drawn from the env's generator (itself seeded by the last seed given)."""
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(2**32))
        elif not 0 <= seed < 2**32:
            raise ValueError(f"ViZDoom seeds are 0 <= seed < 2**32, got {seed}")
        if not self.game.is_running():
            raise RuntimeError("this Two-Colors env is closed; make a new one")
        with self._engine("reset()"):
            self.game.set_seed(seed)
            self.game.new_episode()
            self._read_state()
        self._is_red = int(self._state.game_variables[_IS_RED])
        self._steps = 0
        self._over = False
        return self._obs.copy(), self._info()

    def step(self, action):
        action = action_index(action, len(ACTIONS), "Two-Colors", f"0..{len(ACTIONS) - 1} ({', '.join(ACTIONS)})")
        if self._over:
            raise RuntimeError("this Two-Colors episode is over; call reset() first")
        previous_health = self._health
        with self._engine("step()"):
            reward = self.game.make_action(_BUTTONS[action], FRAME_SKIP)
            finished = self.game.is_episode_finished()
            if finished:  # no new frame: the observation stays the last one
                self._state = None
                self._health = int(self.game.get_game_variable(vzd.GameVariable.HEALTH))
                dead = self.game.is_player_dead()
            else:
                self._read_state()
                dead = False
        if self._health > previous_health:
            reward += HEALTH_BONUS
        self._steps += 1
        terminated = dead
        truncated = not terminated and (finished or self._steps >= self.step_cap)
        self._over = terminated or truncated
        return self._obs.copy(), float(reward), terminated, truncated, self._info()

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self._screen.copy()

    def objects(self) -> tuple[np.ndarray, np.ndarray]:
        """The player's pose [x, y, angle in degrees] and the items on the floor, (n, 3) rows of
        [x, y, is_red], at the current step (map units; no items once the episode is over)."""
        if self._state is None:
            return np.zeros(3), np.zeros((0, 3))
        pose, items = np.zeros(3), []
        for thing in self._state.objects:
            if thing.name == "DoomPlayer":
                pose[:] = thing.position_x, thing.position_y, thing.angle
            elif thing.name in (two_colors.GREEN_ITEM, two_colors.RED_ITEM):
                items.append((thing.position_x, thing.position_y, thing.name == two_colors.RED_ITEM))
        return pose, np.array(items, dtype=np.float64).reshape(-1, 3)

    def close(self) -> None:
        """End the ViZDoom process (again is harmless)."""
        game = getattr(self, "game", None)
        if game is not None:
            game.close()
        _OPEN_ENVS.discard(self)

    def __del__(self):
        self.close()


class TwoColorsExpert:
    """Walks to the nearest item of the pillar's colour on screen whose straight path passes no item
    of the other colour (the nearest one at all when every path is blocked): straight ahead when the
    item is in line, curving towards it when it is far and not too far off to the side, turning in
    place otherwise (so that it does not circle around a near item). With no such item on screen it
    turns in place, the way it turned last, until one comes into view.

    It reads the pillar's colour from the first info and the positions from the env's game state
    (TwoColorsEnv.objects()), so it needs the single env, not just the observation; but it only goes
    for items the observation shows (centre within `sight` of the view axis), so that its choices can
    be learnt from the frames: an expert that heads for items behind it acts on what no frame holds,
    and a policy cloned from it hesitates. Wrong items anywhere count as obstacles (those near its
    path are on screen, or were a few frames ago). With probability `noise` per step it takes a
    random action instead, for a more diverse dataset.
    """

    clearance = 64.0  # units between a path and a wrong item's centre (player radius 16 + item 20 + margin)
    reach = 24.0  # units to the side at which walking straight on still touches the item
    aim = 5.0  # degrees off the target that always count as straight ahead
    curve = 30.0  # degrees off the target up to which it turns while walking (when far)
    far = 160.0  # units from which it turns while walking
    avoid = 140.0  # units within which a wrong item ahead pushes the heading away
    repel = 0.4  # strength of that push (0.4 scored best of 0.4, 0.8 and 1.5 over 12 seeds)
    # degrees either side of the view axis within which an item is on screen: measured with ViZDoom's
    # labels buffer, items up to 52 degrees off were always labelled, none beyond 58 (320x180 screen)
    sight = 50.0

    def __init__(self, noise: float = 0.1):
        self.noise = probability("noise", noise)
        """probability of a random action at each step (coverage of the states it would not visit)"""

    def reset(self, env, info) -> None:
        self.is_red = bool(info["is_red"])
        self.search = 0  # the turn (0 left, 1 right) it makes when no right item is on screen
        # the episode's seed fixes the noise too (env.np_random is seeded by reset)
        self.rng = np.random.default_rng(env.np_random.integers(2**63))

    def act(self, env, obs, info) -> int:
        if self.noise and self.rng.random() < self.noise:
            return int(self.rng.integers(len(ACTIONS)))
        pose, items = env.objects()
        bearings = np.degrees(np.arctan2(items[:, 1] - pose[1], items[:, 0] - pose[0]))
        offsets = (bearings - pose[2] + 180.0) % 360.0 - 180.0
        right = items[(items[:, 2] == self.is_red) & (np.abs(offsets) <= self.sight), :2]
        wrong = items[items[:, 2] != self.is_red, :2]
        if not len(right):
            return self.search
        target = right[np.argmin([self._cost(pose[:2], goal, wrong) for goal in right])]
        to_target = target - pose[:2]
        distance = float(np.hypot(*to_target))
        # sidestep the wrong items ahead that lie within `clearance` of the line to the target and
        # nearer than it: each turns the heading away from its side by repel * (clearance / distance)^2
        # (the player slides on, so a path that only just misses one does not)
        direction = to_target / max(distance, 1e-6)
        across = np.array([-direction[1], direction[0]])  # unit vector to the left of the line
        rel = wrong - pose[:2]
        along, side = rel @ direction, rel @ across
        gaps = np.hypot(rel[:, 0], rel[:, 1])
        near = (along > 0) & (gaps < min(distance, self.avoid)) & (np.abs(side) < self.clearance)
        away = np.where(side[near] > 0, -1.0, 1.0)  # an item on the line (side 0) is passed on its left
        steer = direction + across * (self.repel * away * (self.clearance / np.maximum(gaps[near], 1.0)) ** 2).sum()
        bearing = math.degrees(math.atan2(steer[1], steer[0]))
        off = (bearing - pose[2] + 180.0) % 360.0 - 180.0  # > 0: the heading is to the left
        self.search = 0 if off > 0 else 1
        reach = self.aim if near.any() else max(self.aim, math.degrees(math.atan2(self.reach, distance)))
        if abs(off) <= reach:
            return 2
        if abs(off) <= self.curve and distance > self.far:
            return 3 if off > 0 else 4
        return self.search

    def _cost(self, start: np.ndarray, goal: np.ndarray, wrong: np.ndarray) -> float:
        """Path length, plus a detour's worth for each wrong item within `clearance` of the path."""
        path = goal - start
        length = float(np.hypot(*path))
        if not len(wrong) or length == 0:
            return length
        along = np.clip((wrong - start) @ path / length**2, 0.0, 1.0)
        gaps = np.hypot(*(start + along[:, None] * path - wrong).T)
        return length + 1000.0 * np.count_nonzero(gaps < self.clearance)


class TwoColorsTeacher:
    """The dataset's policy: TwoColorsExpert's actions as labels, on a behaviour that now and then
    makes a detour: for a few steps it acts as the expert of the other colour, heading for (and
    sometimes picking up) wrong items.

    Why: a policy cloned from the expert alone does not act on the pillar's colour
    (training.colour_probe); in the expert's data the agent's own history (the item it is heading
    for) predicts most actions. Where the history sometimes heads for the wrong colour and the label
    still names the right one, only the pillar (and memory of it) predicts the labels. It did not
    help in our runs (README). Labels are the noise-free expert's actions at every step, detours and
    random actions included (the collector stores both, see training.dataset).
    """

    def __init__(self, noise: float = 0.1, detour: float = 0.03, detour_min: int = 4, detour_max: int = 20):
        if not 1 <= detour_min <= detour_max:
            raise ValueError(f"a detour lasts detour_min to detour_max steps, 1 <= detour_min <= detour_max; "
                             f"got {detour_min} and {detour_max}")
        self.noise = probability("noise", noise)
        """probability of a random action at a step outside a detour"""
        self.detour = probability("detour", detour)
        """probability per step outside a detour of starting one"""
        self.detour_min, self.detour_max = int(detour_min), int(detour_max)
        """a detour's length in steps, uniform in detour_min..detour_max (inclusive)"""
        self.expert, self.decoy = TwoColorsExpert(noise=0.0), TwoColorsExpert(noise=0.0)

    def reset(self, env, info) -> None:
        self.expert.reset(env, info)
        self.decoy.reset(env, {**info, "is_red": not info["is_red"]})
        self.rng = np.random.default_rng(env.np_random.integers(2**63))
        self.left = 0  # steps of the current detour still to go

    def act_and_label(self, env, obs, info) -> tuple[int, int]:
        """(the action to take, the expert's action: the label)."""
        label, decoy = self.expert.act(env, obs, info), self.decoy.act(env, obs, info)
        self.last_decoy = decoy  # the other colour's expert's action in this state (training.frame_probe)
        if not self.left and self.rng.random() < self.detour:
            self.left = int(self.rng.integers(self.detour_min, self.detour_max + 1))
        if self.left:
            self.left -= 1
            return decoy, label
        if self.rng.random() < self.noise:
            return int(self.rng.integers(len(ACTIONS))), label
        return label, label

    def act(self, env, obs, info) -> int:
        return self.act_and_label(env, obs, info)[0]


def make_vector_env(num_envs: int, step_cap: int = 2100, render_mode: str | None = None, cue: int = 0):
    """`num_envs` Two-Colors envs stepped in lockstep (autoreset disabled: a finished env keeps its
    last observation, with reward 0, until reset); info arrays is_red and health of shape (num_envs,)."""
    return LockstepVectorEnv([lambda: TwoColorsEnv(step_cap=step_cap, render_mode=render_mode, cue=cue)] * num_envs)
