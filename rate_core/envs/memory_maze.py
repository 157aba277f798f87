"""Memory Maze 9x9: touch the target whose colour the frame border shows, again and again, in a
maze that the agent only ever sees from the inside.

    +---------------------+
    |  r  |       |     b |   a random 9 x 9 maze of rooms and corridors per episode
    |     +--  ---+       |   r, g, b: red, green and blue spheres, fixed for the episode
    |        g        @>  |   @>: the agent, a rolling ball with a camera
    +---------------------+

Built on memory-maze 1.0.3 (`memory_maze.tasks.memory_maze_9x9`: dm_control and MuJoCo, 4 actions
per simulated second, 50 physics steps per action).

Observation: uint8 (3, 64, 64): the agent's camera, channels first, with a 2-pixel border in the
colour of the current target.
Actions: 0 = no-op, 1 = forward, 2 = turn left, 3 = turn right, 4 = forward + left, 5 = forward + right.
Reward: +1 for touching the current target; another target (drawn at random) becomes the current one.
Start: a new maze, new target places, spawn point, heading and first target, all drawn from the
reset's seed (a seed fixes the whole episode).
End: never terminated; truncated after `step_cap` steps (memory-maze's episodes last 1000 steps).
info: target_index (0 red, 1 green, 2 blue: the current target), targets_collected, agent_x and
agent_y (the agent's position in grid cells, from the bottom-left corner), target_bearing (where the
current target lies from the agent's heading, one of BEARINGS: eight 45-degree sectors, "ahead"
centred on the heading; in a straight line, walls ignored).

Speed and memory: memory-maze checks target contacts with a Python loop over MuJoCo's contacts,
for each of the 3 targets at each of the 50 physics steps of an action; that loop takes two thirds
of the time of a step (about 30 steps/s). This env replaces it, on its own targets only, by the
same test in numpy, reading the contacts once per physics step for the 3 targets (about 3 times
faster), keeps the agent's camera from frame to frame (dm_control builds and frees one per frame;
about 1.5 times faster again: on a 2-core AMD EPYC, random actions, 331-360 steps/s against 229-230
with a camera per frame and memory-maze's own 57-61), and lets memory-maze's 10 identical copies of
its wall textures share one (about 0.3 GB instead of 0.85 GB per env, resets twice as fast). Frames
and rewards are those of memory-maze as published (tests/test_memory_maze.py compares them).

Rendering: MuJoCo renders offscreen with EGL where it works (no GPU needed), else OSMesa (Debian
package libosmesa6); MUJOCO_GL, when set, is left alone. `MemoryMazeExpert` plans on the privileged
state (the maze layout, the agent's pose, the targets' places) with a breadth-first search and
steers along the path.
"""

import contextlib
import ctypes.util
import functools
import io
import logging
import os
import subprocess
import sys
import warnings
from collections import deque
from types import MethodType
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rate_core.envs import action_index, probability

OBS_SHAPE = (3, 64, 64)
ACTIONS = ("noop", "forward", "left", "right", "fwd+left", "fwd+right")
TARGET_NAMES = ("red", "green", "blue")
# The current target's direction seen from the agent, in 45-degree sectors counter-clockwise from
# its heading (info["target_bearing"]: what a memory must hold once the target is out of view).
BEARINGS = ("ahead", "ahead-left", "left", "behind-left", "behind", "behind-right", "right", "ahead-right")
MAZE_STEPS = 1000  # memory-maze's time limit for 9x9 (250 s at 4 actions per second)
FRAME_SIZE = 256  # render(): the agent's view and the top-down view, each FRAME_SIZE pixels square
_HIDDEN_GEOM_GROUP = 5  # MuJoCo draws geom groups 0-2 by default: render() hides the agent in group 5

# Whether EGL can render here: a failed OpenGL backend cannot be swapped once dm_control has picked
# it (at import), so the probe runs in a child process.
_EGL_PROBE = "from dm_control import _render; _render.Renderer(max_width=8, max_height=8).free()"


def choose_gl_backend() -> str:
    """Set MUJOCO_GL for this process (and the processes it starts) unless it is set already:
    'egl' when an EGL context can be made (software EGL works without a GPU), else 'osmesa'.
    Returns the backend. Must run before dm_control is imported to have an effect."""
    if "dm_control._render" in sys.modules:  # too late to choose: report what dm_control took
        backend = sys.modules["dm_control._render"].BACKEND
        if "MUJOCO_GL" not in os.environ:
            warnings.warn(f"dm_control was imported before MUJOCO_GL was set and picked {backend!r}; if rendering "
                          "fails, set MUJOCO_GL=egl (or osmesa) or make the Memory Maze env first", stacklevel=2)
        return backend
    if "MUJOCO_GL" not in os.environ:
        try:
            probe = subprocess.run([sys.executable, "-c", _EGL_PROBE], env={**os.environ, "MUJOCO_GL": "egl"},
                                   capture_output=True, text=True, timeout=120)
            lines = probe.stderr.strip().splitlines()
            egl_error = (lines[-1] if lines else f"the probe ended with exit code {probe.returncode}") \
                if probe.returncode else None
        except subprocess.TimeoutExpired:
            egl_error = "the EGL probe did not finish in 120 s"
        if egl_error and ctypes.util.find_library("OSMesa") is None:
            raise RuntimeError(f"MuJoCo cannot render here: EGL failed ({egl_error}) and OSMesa is not installed. "
                               "Install it (Debian/Ubuntu: apt-get install libosmesa6) or set MUJOCO_GL.")
        os.environ["MUJOCO_GL"] = "osmesa" if egl_error else "egl"
    return os.environ["MUJOCO_GL"]


def _update_activation_vectorised(target, physics) -> None:
    """dm_control's TargetSphere._update_activation without the Python loop over contacts: the
    target is activated (and hidden) when any current contact involves its geom. The contacts'
    geoms are read once per physics step for all the targets (_contact_geoms)."""
    if target._activated:
        return
    geoms, involved = _contact_geoms(physics)
    if target._geom_id not in involved:
        return
    touching = (geoms == target._geom_id).any(axis=1)
    if target._specific_collision_geom_ids:
        touching &= np.isin(geoms, target._specific_collision_geom_ids).any(axis=1)
    if touching.any():
        target._activated = True
        physics.bind(target._material).rgba[-1] = 0


def _contact_geoms(physics) -> tuple[np.ndarray, frozenset]:
    """(the (ncon, 2) geoms of the current contacts, the set of geoms among them), kept on `physics`
    until its time moves on: each of the 3 targets asks at each of the 50 physics steps of an action.
    (Each reset compiles a new physics, whose time starts again: nothing kept carries over.)"""
    now = physics.data.time
    kept = getattr(physics, "_rate_contact_geoms", None)
    if kept is None or kept[0] != now:
        geoms = physics.data.contact.geom.copy()
        kept = (now, geoms, frozenset(geoms.ravel().tolist()))
        physics._rate_contact_geoms = kept
    return kept[1], kept[2]


def _camera_kept_per_physics(observable, physics):
    """dm_control's MJCFCamera._callable, keeping its Camera: dm_control builds a Camera (with an
    MjvScene sized for every geom of the maze) for each frame and frees it after, which costs about as
    much as drawing the 64 x 64 frame. This one builds it once per physics (a reset compiles a new
    physics and asks for a new callable) and copies each frame out of it. Same pixels."""
    from dm_control.mujoco.engine import Camera

    camera = Camera(physics, height=observable._height, width=observable._width,
                    camera_id=observable._mjcf_element.full_identifier)

    def get_observation():
        pixels = camera.render(scene_option=observable._scene_option,
                               render_flag_overrides=observable._render_flag_overrides)
        return np.atleast_3d(pixels).copy()  # the camera's buffer is drawn over at the next frame
    return get_observation


def _share_wall_textures(arena) -> None:
    """Keep one copy of each set of identical wall textures in `arena`'s model.

    memory-maze gives each of its 10 wall variations its own copy of the same 8 wall textures:
    80 images of 1024 x 1024, held by MuJoCo's model and again by the OpenGL context, about
    0.55 GB per env, and uploaded at every reset. The variations now share the first copy; each
    episode still picks a variation's texture by its index in the (equal) list, so frames are
    unchanged. Takes effect when the maze's physics is next compiled (MemoryMazeEnv does so at once)."""
    from dm_control.locomotion.arenas.labmaze_textures import WallTextures

    kept = {}  # the images' file contents -> the provider that stays
    for provider in [entity for entity in arena.iter_entities() if isinstance(entity, WallTextures)]:
        images = tuple(texture.file.contents for texture in provider.textures)
        if images not in kept:
            kept[images] = provider
            continue
        for wall_char, textures in arena._wall_textures.items():
            if textures is provider.textures:
                arena._wall_textures[wall_char] = kept[images].textures
        provider.detach()


def _return_freed_memory() -> None:
    """Hand the memory that the C heap holds free back to the system (glibc's malloc_trim; nothing
    elsewhere). A maze's first physics, compiled with every texture copy, leaves about 0.45 GB
    free but still counted to the process until then, and each reset's recompilation about 50 MB."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # no glibc (macOS: no malloc_trim; Windows: no CDLL(None))
        pass


def _new_maze_generator(maze, seed: int):
    """A copy of memory-maze's labmaze generator `maze` (same sizes and tokens) seeded by `seed`:
    labmaze seeds its generator once, when it is made."""
    return type(maze)(height=maze.height, width=maze.width, max_rooms=maze.max_rooms,
                      room_min_size=maze.room_min_size, room_max_size=maze.room_max_size,
                      max_variations=maze.max_variations, spawns_per_room=maze.spawns_per_room,
                      spawn_token=maze.spawn_token, objects_per_room=maze.objects_per_room,
                      object_token=maze.object_token, random_seed=seed)


def _not_velocity_noise(record: logging.LogRecord) -> bool:
    """False for dm_control's "Cannot set velocity on Entity with no free joint", logged at every reset
    of a maze (the targets have no free joint; harmless) and flooding evaluation logs."""
    return "Cannot set velocity on Entity with no free joint" not in record.getMessage()


@functools.cache
def _memory_maze_tasks():
    """memory_maze.tasks, imported once per process after choosing the GL backend, without the noise
    of its dependencies: memory-maze imports gym (0.26), which it needs but does not declare, and
    gym's import prints a notice to move to gymnasium (this code uses gymnasium): that notice is
    dropped, anything else printed passes on; and dm_control's velocity warning (above) is filtered
    from the absl logger, whose other messages pass."""
    choose_gl_backend()
    with contextlib.redirect_stderr(io.StringIO()) as printed:
        from memory_maze import tasks
    if "Gym has been unmaintained" not in printed.getvalue():
        sys.stderr.write(printed.getvalue())
    logging.getLogger("absl").addFilter(_not_velocity_noise)
    return tasks


class MemoryMazeEnv(gym.Env):
    """Memory Maze 9x9 with episodes of at most `step_cap` steps (see the module docstring).

    patched: check target contacts with numpy, keep the agent's camera and share the wall textures
    (True: the same frames and rewards, about 6 times faster, about 0.55 GB less memory); False:
    memory-maze as published, for comparison.
    render_mode "rgb_array": render() gives a (256, 512, 3) frame: on the left the observation
    (with its border) scaled up 4 times, on the right memory-maze's top-down camera over the whole
    maze (rendered once per episode with the agent hidden), the agent drawn on it as an orange disc
    with a white line towards its heading.
    Privileged state for experts: maze_layout, agent_pos, agent_dir, targets_pos, target_index.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, step_cap: int = MAZE_STEPS, render_mode: str | None = None, patched: bool = True):
        if not 1 <= step_cap <= MAZE_STEPS:
            raise ValueError(f"step_cap must be in 1..{MAZE_STEPS} (memory-maze's episode length), got {step_cap}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.step_cap, self.render_mode = step_cap, render_mode
        self.observation_space = spaces.Box(0, 255, shape=OBS_SHAPE, dtype=np.uint8)
        self.action_space = spaces.Discrete(len(ACTIONS))
        tasks = _memory_maze_tasks()

        # global_observables: the privileged state (layout, poses) next to the image, for the expert.
        self.maze_env = tasks.memory_maze_9x9(global_observables=True)
        self._task = self.maze_env.task  # the wrappers hand attribute lookups down to the composer env
        if patched:  # this env's task only; memory-maze itself is unchanged
            for target in self._task._targets:
                target._update_activation = MethodType(_update_activation_vectorised, target)
            camera = self._task._walker.observables.egocentric_camera
            camera._callable = MethodType(_camera_kept_per_physics, camera)
            _share_wall_textures(self._task.root_entity)
            # The physics made above holds every copy of the textures until the first reset
            # recompiles it; recompile now, so that envs made one after another (a vector env's
            # worker makes all of its envs before resetting any) never hold them all at once.
            self.maze_env._recompile_physics_and_update_observables()
            _return_freed_memory()
        self._state: dict[str, Any] = {}
        self._obs = np.zeros(OBS_SHAPE, dtype=np.uint8)
        self._steps = 0
        self._collected = 0
        self._over = True
        self._map: tuple[np.ndarray, np.ndarray, float] | None = None  # render()'s top-down picture of this episode

    def _read(self, timestep) -> None:
        self._state = timestep.observation
        self._obs = np.ascontiguousarray(self._state["image"].transpose(2, 0, 1))

    def _info(self) -> dict:
        x, y = self._state["agent_pos"]
        return {"target_index": self.target_index, "targets_collected": self._collected,
                "agent_x": float(x), "agent_y": float(y),
                "target_bearing": bearing(self.agent_pos, self.agent_dir, self._state["target_pos"])}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """seed: fixes the episode (maze, targets, spawn); without one, the episode is drawn from the
        env's generator (itself seeded by the last seed given)."""
        super().reset(seed=seed)
        if self.maze_env is None:
            raise RuntimeError("this Memory Maze env is closed; make a new one")
        maze_seed, episode_seed = (int(s) for s in self.np_random.integers(2**31, size=2))
        # memory-maze draws each episode's layout from a labmaze generator seeded once, when the env
        # is built (rebuilding it costs a second); a fresh generator, where the arena's regenerate()
        # looks for it, makes the reset's seed fix the layout too.
        arena = self._task.root_entity
        arena._maze = _new_maze_generator(arena.maze, maze_seed)
        self.maze_env.random_state.seed(episode_seed)  # spawn, target places, textures, target order
        self._read(self.maze_env.reset())
        self._map = None
        _return_freed_memory()  # the reset recompiled the physics for the new maze
        self._steps = 0
        self._collected = 0
        self._over = False
        return self._obs.copy(), self._info()

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = action_index(action, len(ACTIONS), "Memory Maze", f"0..{len(ACTIONS) - 1} ({', '.join(ACTIONS)})")
        if self.maze_env is None:
            raise RuntimeError("this Memory Maze env is closed; make a new one")
        if self._over:
            raise RuntimeError("this Memory Maze episode is over; call reset() first")
        timestep = self.maze_env.step(action)
        self._read(timestep)
        reward = float(timestep.reward)
        self._collected += reward > 0
        self._steps += 1
        truncated = timestep.last() or self._steps >= self.step_cap
        self._over = truncated
        return self._obs.copy(), reward, False, truncated, self._info()

    def renderer_name(self) -> str:
        """What draws the frames: the OpenGL backend (MUJOCO_GL, as `choose_gl_backend` set it) and the
        OpenGL renderer of the physics' context (a GPU's, or Mesa's llvmpipe on a CPU)."""
        try:
            from OpenGL import GL

            with self.maze_env.physics.contexts.gl.make_current() as context:
                name = context.call(lambda: GL.glGetString(GL.GL_RENDERER)).decode()
        except Exception as error:  # only a label: say why it is missing rather than fail
            name = f"OpenGL renderer unknown ({type(error).__name__})"
        return f"MuJoCo, MUJOCO_GL={os.environ.get('MUJOCO_GL', '?')}, {name}"

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        from PIL import Image, ImageDraw

        view = self._obs.transpose(1, 2, 0).repeat(4, axis=0).repeat(4, axis=1)
        if self._map is None:
            self._map = self._render_map()
        top_map, eye, pixels_per_metre = self._map
        top = Image.fromarray(top_map)
        # The agent, a ball seen from above: a disc and a line towards its heading. The camera looks
        # straight down from `eye`; cells are xy_scale metres, with the maze's centre at the origin.
        world = (self.agent_pos - np.array(self.maze_layout.shape[::-1]) / 2) * self._task.root_entity.xy_scale
        u, v = FRAME_SIZE / 2 + (world - eye[:2]) * pixels_per_metre * np.array([1, -1])
        dx, dy = self.agent_dir
        draw = ImageDraw.Draw(top)
        draw.line((u, v, u + 14 * dx, v - 14 * dy), fill=(255, 255, 255), width=3)
        draw.ellipse((u - 5, v - 5, u + 5, v + 5), fill=(255, 150, 30), outline=(255, 255, 255))
        return np.concatenate([view, np.asarray(top)], axis=1)

    def _render_map(self) -> tuple[np.ndarray, np.ndarray, float]:
        """memory-maze's top-down camera over the maze with the agent hidden, once per episode: nothing
        else in it moves (a touched target is drawn again before the step ends, and the targets stay
        put), so each frame draws the agent on this picture instead of rendering the maze again (about
        7 ms a step on a CPU). Also where the camera looks from and its pixels per metre."""
        physics, camera = self.maze_env.physics, self._task.root_entity.top_camera.full_identifier
        model = physics.model
        agent = [i for i in range(model.ngeom) if (model.id2name(i, "geom") or "").startswith("walker/")]
        groups = model.geom_group[agent].copy()
        model.geom_group[agent] = _HIDDEN_GEOM_GROUP
        try:
            top = physics.render(FRAME_SIZE, FRAME_SIZE, camera_id=camera)
        finally:
            model.geom_group[agent] = groups
        eye = physics.named.data.cam_xpos[camera].copy()
        pixels_per_metre = FRAME_SIZE / 2 / np.tan(np.radians(physics.named.model.cam_fovy[camera]) / 2) / eye[2]
        return top, eye, float(pixels_per_metre)

    def close(self) -> None:
        """Free MuJoCo's model and rendering contexts (again is harmless)."""
        maze_env = getattr(self, "maze_env", None)
        if maze_env is not None:
            maze_env.close()
            self.maze_env = None

    # Privileged state, for the expert (grid coordinates: x along columns, y along rows from the bottom).
    @property
    def maze_layout(self) -> np.ndarray:
        """(9, 9) uint8, 1 where the agent can go; row 0 is the bottom row (y = 0)."""
        return self._state["maze_layout"]

    @property
    def agent_pos(self) -> np.ndarray:
        """(2,) float: x, y in cells; the cell is the integer part."""
        return self._state["agent_pos"]

    @property
    def agent_dir(self) -> np.ndarray:
        """(2,) float: the unit vector the agent faces (forward moves along it)."""
        return self._state["agent_dir"]

    @property
    def targets_pos(self) -> np.ndarray:
        """(3, 2) float: the targets' centres, in cells."""
        return self._state["targets_pos"]

    @property
    def target_index(self) -> int:
        """The current target (0 red, 1 green, 2 blue)."""
        return int(np.flatnonzero((self._state["targets_pos"] == self._state["target_pos"]).all(axis=1))[0])


_STEPS4 = ((1, 0), (-1, 0), (0, 1), (0, -1))


def angle_off(heading: np.ndarray, direction: np.ndarray) -> float:
    """Degrees from `heading` to `direction` (2-vectors), in (-180, 180]; > 0: to the left."""
    return float(np.degrees(np.arctan2(heading[0] * direction[1] - heading[1] * direction[0], heading @ direction)))


def bearing(position, heading, point) -> str:
    """Which of the BEARINGS `point` lies in, seen from `position` facing `heading` (all in cells)."""
    to_point = np.asarray(point, dtype=float) - np.asarray(position, dtype=float)
    angle = angle_off(np.asarray(heading, dtype=float), to_point)
    return BEARINGS[int(np.floor((angle + 22.5) / 45.0)) % len(BEARINGS)]


def grid_distances(layout: np.ndarray, goal: tuple[int, int]) -> np.ndarray:
    """(H, W) steps from each cell to `goal` (x, y) through free cells of `layout` (4-connected
    breadth-first search); -1 where the goal cannot be reached."""
    distance = np.full(layout.shape, -1, dtype=np.int64)
    x, y = goal
    distance[y, x] = 0
    queue = deque([goal])
    while queue:
        x, y = queue.popleft()
        for dx, dy in _STEPS4:
            nx, ny = x + dx, y + dy
            if 0 <= ny < layout.shape[0] and 0 <= nx < layout.shape[1] and layout[ny, nx] and distance[ny, nx] < 0:
                distance[ny, nx] = distance[y, x] + 1
                queue.append((nx, ny))
    return distance


class MemoryMazeExpert:
    """Walks shortest paths to the current target on the privileged maze layout.

    A breadth-first search from each target gives the grid distance of every cell; from the
    agent's cell it follows the path and aims at the farthest path cell that it sees in a straight
    line with room for the ball (so it cuts corners and crosses rooms diagonally). It walks
    straight when the aim is within `aim` degrees, curves when within `curve` degrees and turns in
    place otherwise. With probability `noise` per step it takes a random action instead.
    """

    aim = 10.0  # degrees off the aim point that count as straight ahead (a turn step is about 18)
    curve = 60.0  # degrees off up to which it turns while walking
    lookahead = 6  # path cells it considers as aim points
    clearance = 0.2  # cells between the straight line to an aim point and a wall (the ball's radius is 0.1)

    def __init__(self, noise: float = 0.1):
        self.noise = probability("noise", noise)
        """probability of a random action at each step (coverage of states the planner would not visit)"""

    def reset(self, env: MemoryMazeEnv, info: dict) -> None:
        # the episode's seed fixes the noise too (env.np_random is seeded by reset)
        self.rng = np.random.default_rng(env.np_random.integers(2**63))
        self.layout = np.asarray(env.maze_layout).astype(bool)
        cells = np.floor(env.targets_pos).astype(int)
        self.distances = [grid_distances(self.layout, (int(x), int(y))) for x, y in cells]

    def act(self, env: MemoryMazeEnv, obs, info) -> int:
        if self.noise and self.rng.random() < self.noise:
            return int(self.rng.integers(len(ACTIONS)))
        position = np.asarray(env.agent_pos, dtype=float)
        target = env.target_index
        return self._steer(position, env.agent_dir, self._aim_point(position, self.distances[target],
                                                                    env.targets_pos[target]))

    def _steer(self, position: np.ndarray, heading: np.ndarray, aim: np.ndarray) -> int:
        off = angle_off(heading, aim - position)  # > 0: left
        if abs(off) <= self.aim:
            return 1
        if abs(off) <= self.curve:
            return 4 if off > 0 else 5
        return 2 if off > 0 else 3

    def _aim_point(self, position: np.ndarray, distance: np.ndarray, goal_pos: np.ndarray,
                   free: np.ndarray | None = None) -> np.ndarray:
        """The farthest cell centre along the shortest path (up to `lookahead` cells) to `goal_pos`
        (whose cell has `distance` 0) in clear sight; paths and sight lines keep to the cells of
        `free` ((H, W) bool, default: the layout's free cells)."""
        free = self.layout if free is None else free
        cell = self._cell(position)
        path = []
        while len(path) < self.lookahead and distance[cell[1], cell[0]] > 0:
            x, y = cell
            cell = min(((x + dx, y + dy) for dx, dy in _STEPS4 if self._free(x + dx, y + dy, free)
                        and distance[y + dy, x + dx] >= 0), key=lambda c: distance[c[1], c[0]])
            path.append(cell)
        if not path:
            return np.asarray(goal_pos, dtype=float)
        centres = [np.asarray(goal_pos, dtype=float) if distance[y, x] == 0 else np.array([x + 0.5, y + 0.5])
                   for x, y in path]
        for centre in reversed(centres[1:]):
            if self._clear(position, centre, free=free):
                return centre
        return centres[0]

    def _cell(self, position: np.ndarray) -> tuple[int, int]:
        x, y = (int(v) for v in np.clip(np.floor(position), 0, np.array(self.layout.shape[::-1]) - 1))
        return x, y

    def _free(self, x: int, y: int, free: np.ndarray | None = None) -> bool:
        free = self.layout if free is None else free
        return 0 <= y < free.shape[0] and 0 <= x < free.shape[1] and bool(free[y, x])

    def _clear(self, start: np.ndarray, end: np.ndarray, clearance: float | None = None,
               free: np.ndarray | None = None) -> bool:
        """Whether a ball can roll straight from `start` to `end`: points along the line and
        `clearance` (default: the class's) to either side of it are all in cells of `free` (default:
        the layout's free cells)."""
        free = self.layout if free is None else free
        line = end - start
        length = float(np.hypot(*line))
        if length == 0:
            return True
        side = np.array([-line[1], line[0]]) / length * (self.clearance if clearance is None else clearance)
        t = np.linspace(0.0, 1.0, int(length / 0.1) + 2)[:, None]
        points = np.concatenate([start + t * line + offset for offset in (0.0, side, -side)])
        cells = np.floor(points).astype(int)
        inside = ((cells >= 0) & (cells < np.array(free.shape[::-1]))).all(axis=1)
        return bool(inside.all() and free[cells[:, 1], cells[:, 0]].all())


class ExploringMemoryMazeExpert(MemoryMazeExpert):
    """Goes for the current target only once it has seen it; until then it explores.

    MemoryMazeExpert walks straight to targets it has never seen, which no observation explains: a
    policy cloned from it learns to wander. This one remembers the targets and the free cells that
    came into its view (within `fov` degrees of its heading, `sight` cells away, in a straight
    line through free cells). While the current target is unseen it walks to the nearest free cell
    it has not seen yet; once seen, the shortest path as its parent (the layout stays privileged:
    an agent learns it by looking around).

    With `recall` > 0 it remembers only what it saw in its last `recall` steps: a target out of view
    for longer is unseen again (it explores), and so are free cells, so it explores towards the
    cells it saw longest ago. Its behaviour then rests on the recent past only, which a policy with
    a bounded memory can follow.

    With `seen_only` it plans on what it has seen instead of the privileged layout: paths to a
    target and sight lines for cutting corners keep to cells it has seen (its own cell counts as
    seen), and it explores towards the nearest frontier: an unseen free cell next to a seen cell it
    can reach through seen cells. Its steps then follow from its observations, as a clone's must.
    """

    fov = 40.0  # half-angle of the view: the egocentric camera has fovy 80 degrees and a square image
    sight = 6.0  # cells: a target farther away is a few pixels

    def __init__(self, noise: float = 0.1, recall: float = 0.0, seen_only: bool = False):
        super().__init__(noise)
        if recall < 0:
            raise ValueError(f"recall must be 0 (remember everything) or a number of steps, got {recall}")
        if seen_only not in (0, 1):
            raise ValueError(f"seen_only must be 0 (plan on the layout) or 1 (on the cells seen), got {seen_only}")
        self.recall = recall
        """steps for which what it saw counts as known (0: the whole episode)"""
        self.seen_only = bool(seen_only)
        """plan paths through the cells it has seen only (else through the privileged layout)"""

    def reset(self, env: MemoryMazeEnv, info: dict) -> None:
        super().reset(env, info)
        self.steps = 0
        self.target_seen_at = np.full(len(env.targets_pos), -np.inf)  # the step each target was last in view
        self.seen_at = np.full(self.layout.shape, -np.inf)  # the step each cell was last in view
        self._to_cell: dict[tuple[int, int], np.ndarray] = {}  # grid distances to explored-towards cells

    def _known(self, seen_at: np.ndarray) -> np.ndarray:
        return seen_at > -np.inf if not self.recall else self.steps - seen_at <= self.recall

    @property
    def seen_targets(self) -> set[int]:
        """The targets it knows the place of."""
        return {int(i) for i in np.flatnonzero(self._known(self.target_seen_at))}

    @property
    def seen(self) -> np.ndarray:
        """(H, W) bool: the cells it knows as seen."""
        return self._known(self.seen_at)

    def act(self, env: MemoryMazeEnv, obs, info) -> int:
        self.steps += 1
        position, heading = np.asarray(env.agent_pos, dtype=float), np.asarray(env.agent_dir, dtype=float)
        self._look(position, heading, np.asarray(env.targets_pos, dtype=float))
        target = env.target_index
        if self.seen_only:
            return self._act_on_seen(env, position, heading, target)
        goal = None if target in self.seen_targets else self._nearest_unseen(position)
        if goal is None:
            return super().act(env, obs, info)
        if self.noise and self.rng.random() < self.noise:
            return int(self.rng.integers(len(ACTIONS)))
        if goal not in self._to_cell:
            self._to_cell[goal] = grid_distances(self.layout, goal)
        centre = np.array([goal[0] + 0.5, goal[1] + 0.5])
        return self._steer(position, heading, self._aim_point(position, self._to_cell[goal], centre))

    def _act_on_seen(self, env: MemoryMazeEnv, position: np.ndarray, heading: np.ndarray, target: int) -> int:
        x, y = self._cell(position)
        self.seen_at[y, x] = self.steps  # where it stands is known
        seen, plan = self.seen, None
        if target in self.seen_targets:
            goal_pos = np.asarray(env.targets_pos[target], dtype=float)
            plan = self._plan_through(seen, self._cell(goal_pos))
            if plan[1][y, x] < 0:  # seen across cells it has not: find a way round first
                plan = None
        if plan is None:
            goal = self._frontier((x, y), seen)
            if goal is None:  # every reachable cell seen, the target not yet: on the layout as its parent
                return super().act(env, None, None)
            goal_pos = np.array([goal[0] + 0.5, goal[1] + 0.5])
            plan = self._plan_through(seen, goal)
        if self.noise and self.rng.random() < self.noise:
            return int(self.rng.integers(len(ACTIONS)))
        known, distance = plan
        return self._steer(position, heading, self._aim_point(position, distance, goal_pos, free=known))

    @staticmethod
    def _plan_through(seen: np.ndarray, goal: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(the cells a path may use: those `seen` and the goal's, the grid distances to `goal` through them)."""
        known = seen.copy()
        known[goal[1], goal[0]] = True
        return known, grid_distances(known, goal)

    def _frontier(self, cell: tuple[int, int], known: np.ndarray) -> tuple[int, int] | None:
        """The unseen free cell (x, y) fewest steps from `cell` through `known` cells (it is next to
        one of them); with a bounded recall and no such cell, the known cell seen longest ago; else None."""
        here = grid_distances(known, cell).astype(float)
        here[here < 0] = np.inf
        padded = np.pad(here, 1, constant_values=np.inf)
        nearest = np.min([padded[1 + dy:1 + dy + here.shape[0], 1 + dx:1 + dx + here.shape[1]]
                          for dx, dy in _STEPS4], axis=0) + 1
        nearest[~(self.layout & ~known)] = np.inf
        if np.isfinite(nearest).any():
            y, x = np.unravel_index(int(np.argmin(nearest)), nearest.shape)
            return int(x), int(y)
        return self._seen_longest_ago(np.isfinite(here), here) if self.recall else None

    def _seen_longest_ago(self, reachable: np.ndarray, here: np.ndarray) -> tuple[int, int]:
        """Of the `reachable` cells ((H, W) bool), the one (x, y) seen longest ago; on a tie the one
        fewest steps away by `here`."""
        ys, xs = np.nonzero(reachable)
        oldest = self.seen_at[ys, xs] == self.seen_at[ys, xs].min()
        ys, xs = ys[oldest], xs[oldest]
        i = int(np.argmin(here[ys, xs]))
        return int(xs[i]), int(ys[i])

    def _in_view(self, position: np.ndarray, heading: np.ndarray, points: np.ndarray) -> np.ndarray:
        """(n,) bool: which of the (n, 2) points the agent sees now."""
        rel = points - position
        distance = np.hypot(rel[:, 0], rel[:, 1])
        cos = (rel @ heading) / np.maximum(distance, 1e-9)
        candidate = (distance <= self.sight) & ((distance < 0.5) | (cos >= np.cos(np.radians(self.fov))))
        return np.array([bool(c) and self._clear(position, p, clearance=0.0)
                         for c, p in zip(candidate, points, strict=True)])

    def _look(self, position: np.ndarray, heading: np.ndarray, targets: np.ndarray) -> None:
        self.target_seen_at[self._in_view(position, heading, targets)] = self.steps
        # with a bounded recall, cells in view again are seen anew; else only unseen ones matter
        ys, xs = np.nonzero(self.layout if self.recall else self.layout & ~self.seen)
        if len(xs):
            seen = self._in_view(position, heading, np.stack([xs + 0.5, ys + 0.5], axis=1))
            self.seen_at[ys[seen], xs[seen]] = self.steps

    def _nearest_unseen(self, position: np.ndarray) -> tuple[int, int] | None:
        """The unseen free cell (x, y) fewest steps away; when every reachable cell is seen, None, or
        with a bounded recall the one seen longest ago."""
        here = grid_distances(self.layout, self._cell(position))
        ys, xs = np.nonzero(self.layout & ~self.seen & (here >= 0))
        if not len(xs):
            return self._seen_longest_ago(self.layout & (here >= 0), here) if self.recall else None
        i = int(np.argmin(here[ys, xs]))
        return int(xs[i]), int(ys[i])


class MemoryMazeTeacher:
    """The dataset's policy with clean labels: it behaves as ExploringMemoryMazeExpert (random actions
    at a rate `noise`) and labels every step with the action the same expert takes without noise.

    Why: cloned from the noisy expert, a policy also learns its random actions (a loss floor of
    about 0.42 nats) and, sampling, strays as often. Here the random steps still put the data in
    states off the expert's path, and the label there says how to get back (as DART does). With the
    same seed the behaviour is the noisy expert's step for step: its random generator is drawn the
    same way.
    """

    def __init__(self, noise: float = 0.1, recall: float = 0.0, seen_only: bool = False):
        self.noise = probability("noise", noise)
        """probability of a random action at each step"""
        self.recall = recall
        """steps the expert remembers what it saw (ExploringMemoryMazeExpert; 0: the whole episode)"""
        self.seen_only = bool(seen_only)
        """the expert plans through the cells it has seen only (ExploringMemoryMazeExpert)"""
        self.expert = ExploringMemoryMazeExpert(noise=0.0, recall=recall, seen_only=seen_only)

    def reset(self, env: MemoryMazeEnv, info: dict) -> None:
        self.expert.reset(env, info)
        self.rng = self.expert.rng  # drawn as the noisy expert draws it

    def act_and_label(self, env: MemoryMazeEnv, obs, info) -> tuple[int, int]:
        """(the action to take, the noise-free expert's action: the label)."""
        label = self.expert.act(env, obs, info)
        if self.noise and self.rng.random() < self.noise:
            return int(self.rng.integers(len(ACTIONS))), label
        return label, label

    def act(self, env: MemoryMazeEnv, obs, info) -> int:
        return self.act_and_label(env, obs, info)[0]


def make_vector_env(num_envs: int, step_cap: int = MAZE_STEPS, render_mode: str | None = None,
                    num_workers: int | None = None):
    """`num_envs` Memory Maze envs stepped in lockstep in `num_workers` processes (default: one per
    CPU core), autoreset disabled; info arrays target_index, targets_collected, agent_x, agent_y of
    shape (num_envs,)."""
    from rate_core.envs.subproc import SubprocLockstepVectorEnv

    choose_gl_backend()  # here, once: the workers inherit the choice
    make = functools.partial(MemoryMazeEnv, step_cap=step_cap, render_mode=render_mode)
    return SubprocLockstepVectorEnv([make] * num_envs, num_workers=num_workers)
