"""The task registry: one entry per task, read by the collector, the trainer, the evaluator and the app.

An entry knows how to make the task's environment (single and batched), its observation kind and
shape, its action count, its expert, its dataset defaults, its default model configs (one per
mode) and its evaluation protocol. Environment packages are imported only when an env is made.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from rate_core.model import ModelConfig


@dataclass(frozen=True)
class EvalProtocol:
    """How a task's agents are scored."""

    setting: str
    """the environment setting that varies across the evaluation (e.g. episode_length)"""
    values: tuple
    """the values of that setting to evaluate at"""
    episodes: int = 100
    """episodes per value"""
    sample_actions: bool = False
    """sample from the softmax (True) or take the argmax"""
    temperature: float = 1.0
    """sampled actions are drawn from softmax(logits / temperature)"""
    target_return: float = 1.0
    """return-to-go given to the model at the first step"""
    metric: str = "success"
    """success (success rate) or return (mean return)"""
    balance_key: str | None = None
    """info key whose two values the seed list is balanced between (e.g. the cue side); results are
    also reported per value"""
    max_envs: int | None = None
    """at most this many envs at once (memory-hungry envs); more episodes run in consecutive batches"""
    group_names: tuple[tuple[Any, str], ...] = ()
    """names of the balance key's values for the report, e.g. ((1, "red"), (0, "green"))"""


def result_key(metric: str) -> str:
    """The key of an evaluation result (a row of eval.json's "results") that holds the metric `metric`."""
    return "success_rate" if metric == "success" else "mean_return"


@dataclass(frozen=True)
class TrainDefaults:
    """Training hyper-parameters that reproduce the shipped checkpoint of a task."""

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-4
    weight_decay: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    eval_values: tuple = ()
    """values of the evaluation setting checked during training (default: the protocol's first two)"""


@dataclass(frozen=True)
class DemoSetting:
    """The one environment setting the app lets a visitor change (e.g. the T-Maze length)."""

    name: str
    """keyword of make_env / make_vector_env"""
    label: str
    minimum: int
    maximum: int
    default: int
    info: str = ""
    example: int | None = None
    """the value of the app's second example (default: half the maximum)"""
    odd: bool = False
    """only odd values (Minigrid's grid size)"""

    def allows(self, value) -> bool:
        """Whether `value` (a number) is one of the setting's values."""
        return (float(value).is_integer() and self.minimum <= value <= self.maximum
                and not (self.odd and value % 2 == 0))

    def described(self) -> str:
        """The setting's values in words, for a message: "a whole number from 10 to 1200"."""
        return f"{'an odd' if self.odd else 'a'} whole number from {self.minimum} to {self.maximum}"


@dataclass(frozen=True)
class Task:
    """Everything the project knows about one task."""

    name: str
    title: str
    obs_kind: str
    obs_shape: tuple[int, ...]
    act_dim: int
    make_env: Callable[..., Any]
    """make_env(**settings) -> gymnasium.Env"""
    make_vector_env: Callable[..., Any]
    """make_vector_env(num_envs, **settings) -> gymnasium.vector.VectorEnv (autoreset disabled)"""
    make_expert: Callable[[], Any]
    """make_expert() -> an object with reset(env, info) and act(env, obs, info) -> action; `env` is the
    single env (from make_env) so that experts may read privileged state"""
    dataset_settings: tuple[dict, ...]
    """environment settings the collector cycles through (one group of episodes each)"""
    dataset_episodes: int
    """default number of expert episodes per setting"""
    model_configs: dict[str, ModelConfig]
    """default architecture per mode (rate, rmt, trxl, dt)"""
    evaluation: EvalProtocol
    train: TrainDefaults = field(default_factory=TrainDefaults)
    dataset_seed: int = 0
    """seed of the collector's first episode; tasks whose seeds draw the layout start far above the
    evaluator's seeds (0 upwards) so that evaluation episodes are not training episodes"""
    dataset_success_only: bool = False
    """keep only successful expert episodes (the collector runs more seeds until it has enough)"""
    make_teacher: Callable[..., Any] | None = None
    """a policy the collector can run instead of the expert (`collect --teacher`): make_teacher(**options)
    -> an object with reset(env, info) and act_and_label(env, obs, info) -> (action taken, the expert's
    action); the dataset then holds both, and the trainer predicts the labels. Options (keyword
    numbers, `collect --teacher-options`) replace the teacher's defaults, e.g. noise"""
    default_settings: dict = field(default_factory=dict)
    """environment settings used when none are given (e.g. for the app)"""
    action_names: tuple[str, ...] = ()
    """short names of the actions, for the app"""
    demo_setting: DemoSetting | None = None
    """the setting the app exposes (None: none)"""
    demo_step_cap: int | None = None
    """default step cap of the app's episodes (None: play to the end)"""
    explain: Callable[[dict], str] | None = None
    """explain(reset_info) -> a few words on what the agent must remember (e.g. 'cue: up')"""
    counterfactual_label: str = "cue"
    """what the counterfactual changes, in words"""
    counterfactual: Callable[[Any], Any] | None = None
    """counterfactual(observations (T, ...)) -> a copy with what the agent must remember flipped (the
    other T-Maze cue), everything else equal: the app replays an episode with it ('what if')"""
    aux_label: str | None = None
    """the env's info key, at every step, that the collector stores as the dataset's auxiliary labels:
    what the agent must remember (e.g. the pillar's colour); `train --aux-weight` asks the model to
    predict it at every step"""
    aux_values: tuple = ()
    """the values aux_label takes, in class order (the stored label is the value's index)"""
    about: str = ""
    """a few sentences for the app's visitors: what the agent sees, what it must remember, what it scores"""
    env_memory_gb: float = 0.0
    """host memory one env of the vector env holds, in GB (0: too little to matter); batched evaluation
    runs fewer envs at once where the available memory cannot hold the envs asked for (envs_that_fit)"""
    worker_memory_gb: float = 0.0
    """host memory each worker process of the vector env holds besides its envs, in GB (vector envs
    that step their envs in one worker per CPU core, at most one per env)"""
    max_steps: Callable[[dict], int] | None = None
    """max_steps(settings) -> the most steps an episode with these settings can last, where the env
    ends it earlier than its episode_length or step_cap setting says (None: that setting)"""

    @property
    def aux_classes(self) -> int:
        return len(self.aux_values)

    def aux_class(self, info: dict) -> int:
        """The class of this step's auxiliary label (its index in aux_values)."""
        value = info[self.aux_label]
        if value not in self.aux_values:
            raise ValueError(f"task {self.name}: {self.aux_label}={value!r} is none of {self.aux_values}")
        return self.aux_values.index(value)

    def env_memory_need_gb(self, envs: int) -> float:
        """The host memory a vector env of `envs` envs holds, in GB (0 where the task counts none)."""
        return envs * self.env_memory_gb + min(envs, os.cpu_count() or 1) * self.worker_memory_gb

    def envs_that_fit(self, wanted: int, available_gb: float | None) -> int:
        """How many of `wanted` envs to make at once where `available_gb` of memory is available (None:
        unknown): all of them, or as many as 80% of it holds (env_memory_need_gb), at least 1."""
        fits = wanted
        while available_gb is not None and fits > 1 and self.env_memory_need_gb(fits) > 0.8 * available_gb:
            fits -= 1
        return fits

    def episode_limit(self, settings: dict) -> int | None:
        """The most steps an episode with these env settings (the task's defaults for those not given)
        lasts (None: the task sets no limit)."""
        settings = {**self.default_settings, **settings}
        if self.max_steps is not None:
            return self.max_steps(settings)
        return settings.get("episode_length") or settings.get("step_cap")

    def model_config(self, mode: str) -> ModelConfig:
        if mode not in self.model_configs:
            raise KeyError(f"task {self.name!r} has no {mode!r} config; available: {', '.join(self.model_configs)}")
        return self.model_configs[mode]


def available_memory_gb() -> float | None:
    """The memory the system can give new processes now, in GB (Linux's MemAvailable; elsewhere the
    free physical pages), or None where neither is known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (AttributeError, ValueError, OSError):
        return None


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called `name`; a KeyError lists the known ones."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def mode_variants(rate: ModelConfig, cache_len: int) -> dict[str, ModelConfig]:
    """RATE, RMT, TrXL and DT configs that share `rate`'s layers; cache_len is TrXL's mem_len."""
    return {
        "rate": rate,
        "rmt": replace(rate, mode="rmt", mem_len=0, n_head_ca=0),
        "trxl": replace(rate, mode="trxl", num_mem_tokens=0, n_head_ca=0, mem_len=cache_len),
        "dt": replace(rate, mode="dt", num_mem_tokens=0, mem_len=0, n_head_ca=0),
    }


# --------------------------------------------------------------------------------------- T-Maze
class TMazeOracle:
    """Always +x, then turn to the cued side at the junction (reads the cue from info)."""

    def reset(self, env, info):
        self.cue = int(info["cue"])

    def act(self, env, obs, info):
        from rate_core.envs.tmaze import DOWN, FORWARD, UP

        at_junction = obs[2] == 1
        return (UP if self.cue > 0 else DOWN) if at_junction else FORWARD


def _tmaze_env(episode_length: int = 150, render_mode: str | None = None):
    from rate_core.envs.tmaze import TMazeEnv

    return TMazeEnv(episode_length=episode_length, render_mode=render_mode)


def _tmaze_vector_env(num_envs: int, episode_length: int = 150, render_mode: str | None = None):
    from rate_core.envs.tmaze import TMazeVectorEnv

    return TMazeVectorEnv(num_envs, episode_length=episode_length, render_mode=render_mode)


def _tmaze_explain(reset_info: dict) -> str:
    return f"cue: {'up' if reset_info.get('cue', 1) > 0 else 'down'}"


def _tmaze_flip_cue(observations):
    flipped = observations.copy()
    flipped[0, 1] = -flipped[0, 1]  # the cue is in the first observation only
    return flipped


# Smaller than the paper's 8 layers of 8 heads x 64 (rate_core.paper): T-Maze needs memory, not
# width, and this trains in minutes on two CPU cores.
_TMAZE_RATE = ModelConfig(
    mode="rate", obs_kind="vector", obs_shape=(4,), act_dim=4, context_length=50, sections=3,
    d_model=64, n_layer=4, n_head=4, d_head=16, use_ffn=False, num_mem_tokens=10, mem_len=0, n_head_ca=2,
    dropout=0.1, dropatt=0.0,
)

register(Task(
    name="tmaze",
    title="T-Maze (passive)",
    obs_kind="vector",
    obs_shape=(4,),
    act_dim=4,
    make_env=_tmaze_env,
    make_vector_env=_tmaze_vector_env,
    make_expert=TMazeOracle,
    # Oracle episodes whose length is a multiple of K up to K * N (as the paper's T-Maze data).
    dataset_settings=({"episode_length": 50}, {"episode_length": 100}, {"episode_length": 150}),
    dataset_episodes=600,
    model_configs=mode_variants(_TMAZE_RATE, cache_len=3 * 50 * 3),
    evaluation=EvalProtocol(setting="episode_length", values=(150, 300, 600, 900, 1200, 2400, 4800, 9600),
                            episodes=100, sample_actions=False, target_return=1.0, metric="success",
                            balance_key="cue", group_names=((1, "up"), (-1, "down"))),
    train=TrainDefaults(epochs=30, batch_size=32, learning_rate=5e-4, weight_decay=1e-3, warmup_steps=100),
    default_settings={"episode_length": 150},
    action_names=("right", "up", "left", "down"),
    demo_setting=DemoSetting("episode_length", "corridor length T (steps)", minimum=10, maximum=1200, default=300,
                             info="the agent walks T - 2 cells, then must turn to the side the cue showed at step 0"),
    explain=_tmaze_explain,
    about=("A corridor of T - 2 cells. At the first step the agent is shown a cue, up or down; then it walks "
           "the corridor and at the junction must turn to the cue's side (success 1, else 0). The models were "
           "trained on corridors of at most 150 steps. RATE carries the cue from segment to segment in its "
           "memory tokens; DT sees the last 150 steps, so past T = 150 its window no longer holds the cue and "
           "it can only guess."),
    counterfactual=_tmaze_flip_cue,
    aux_label="cue",
    aux_values=(-1, 1),
))


# ------------------------------------------------------------------------------ Minigrid-Memory
def _minigrid_env(size: int = 41, step_cap: int = 500, render_mode: str | None = None):
    from rate_core.envs.minigrid_memory import MinigridMemoryEnv

    return MinigridMemoryEnv(size=size, step_cap=step_cap, render_mode=render_mode)


def _minigrid_vector_env(num_envs: int, size: int = 41, step_cap: int = 500, render_mode: str | None = None):
    from rate_core.envs.lockstep import LockstepVectorEnv

    return LockstepVectorEnv([lambda: _minigrid_env(size, step_cap, render_mode)] * num_envs)


def _minigrid_max_steps(settings: dict) -> int:
    from rate_core.envs.minigrid_memory import episode_limit

    return episode_limit(settings["size"], settings["step_cap"])


def _minigrid_expert():
    from rate_core.envs.minigrid_memory import MinigridMemoryExpert

    return MinigridMemoryExpert()


def _minigrid_explain(reset_info: dict) -> str:
    return f"cue: {('key', 'ball')[int(reset_info.get('cue', 0))]}"


# K = 30, N = 3 as the paper; a small encoder and 4 layers so that it trains on two CPU cores. The
# FFN is on as in the paper: the choice at the junction is an XOR (cue == seen object), and without
# it the model stayed at chance for 1,900 updates.
_MINIGRID_RATE = ModelConfig(
    mode="rate", obs_kind="image", obs_shape=(3, 84, 84), act_dim=3, context_length=30, sections=3,
    d_model=64, n_layer=4, n_head=4, d_head=16, use_ffn=True, d_inner=256, num_mem_tokens=10, mem_len=0,
    n_head_ca=2, dropout=0.1, dropatt=0.0, conv_channels=(16, 32, 32),
)

register(Task(
    name="minigrid_memory",
    title="Minigrid-Memory",
    obs_kind="image",
    obs_shape=(3, 84, 84),
    act_dim=3,
    make_env=_minigrid_env,
    make_vector_env=_minigrid_vector_env,
    make_expert=_minigrid_expert,
    dataset_settings=({"size": 11}, {"size": 21}, {"size": 41}),
    dataset_episodes=2000,
    dataset_success_only=True,
    model_configs=mode_variants(_MINIGRID_RATE, cache_len=3 * 30 * 3),
    evaluation=EvalProtocol(setting="size", values=(11, 21, 41, 61, 91, 201), episodes=100, sample_actions=True,
                            target_return=0.96, metric="success", balance_key="cue",
                            group_names=((0, "key"), (1, "ball"))),
    train=TrainDefaults(epochs=20, batch_size=32, learning_rate=5e-4, weight_decay=1e-3, warmup_steps=200,
                        eval_values=(41, 91)),
    default_settings={"size": 41, "step_cap": 500},
    max_steps=_minigrid_max_steps,
    action_names=("left", "right", "forward"),
    demo_setting=DemoSetting("size", "grid size (odd)", minimum=7, maximum=201, default=41, example=91, odd=True,
                             info="the hallway is about size - 5 cells long; trained at 11, 21 and 41"),
    explain=_minigrid_explain,
    about=("A gridworld seen through a 3x3 window in front of the agent. The start room holds an object, a key "
           "or a ball, which the agent must go and look at; at the end of a long hallway it must then step next "
           "to the same one of two (success, and a return that shrinks with the steps taken). The grid size sets "
           "the hallway's length: the models were trained at 11, 21 and 41, and larger grids ask memory to carry "
           "the cue further; DT sees the last 90 steps."),
    aux_label="cue",
    aux_values=(0, 1),
))


# --------------------------------------------------------------------------- ViZDoom-Two-Colors
def _two_colors_env(step_cap: int = 2100, render_mode: str | None = None, cue: int = 0):
    from rate_core.envs.vizdoom_two_colors import TwoColorsEnv

    return TwoColorsEnv(step_cap=step_cap, render_mode=render_mode, cue=cue)


def _two_colors_vector_env(num_envs: int, step_cap: int = 2100, render_mode: str | None = None, cue: int = 0):
    from rate_core.envs.vizdoom_two_colors import make_vector_env

    return make_vector_env(num_envs, step_cap=step_cap, render_mode=render_mode, cue=cue)


def _two_colors_expert():
    from rate_core.envs.vizdoom_two_colors import TwoColorsExpert

    return TwoColorsExpert()


def _two_colors_teacher(**options):
    from rate_core.envs.vizdoom_two_colors import TwoColorsTeacher

    return TwoColorsTeacher(**{"detour": 1 / 12, **options})


def _two_colors_explain(reset_info: dict) -> str:
    return f"pillar: {'red' if reset_info.get('is_red', 0) else 'green'}"


# K = 50, N = 3 as the paper; a small encoder and 4 layers so that it trains on two CPU cores.
_TWO_COLORS_RATE = ModelConfig(
    mode="rate", obs_kind="image", obs_shape=(3, 64, 112), act_dim=5, context_length=50, sections=3,
    d_model=64, n_layer=4, n_head=4, d_head=16, use_ffn=True, d_inner=256, num_mem_tokens=10, n_head_ca=2,
    conv_channels=(16, 32, 32), dropout=0.1, dropatt=0.0,
)

register(Task(
    name="vizdoom_two_colors",
    title="ViZDoom Two-Colors",
    obs_kind="image",
    obs_shape=(3, 64, 112),
    act_dim=5,
    make_env=_two_colors_env,
    make_vector_env=_two_colors_vector_env,
    make_expert=_two_colors_expert,
    make_teacher=_two_colors_teacher,
    # As the paper's dataset: the first 150 steps (K * N) of each episode; 1,500 episodes (the paper:
    # 5,000) are 225k frames (4.8 GB), a few minutes of collection. Seeds from 1,000,000: the
    # evaluator's episodes (seeds from 0) are not in the data. `collect --teacher` runs the teacher
    # instead (detours to the other colour, labelled with the expert's actions; README).
    dataset_settings=({"step_cap": 150},),
    dataset_episodes=1500,
    dataset_seed=1_000_000,
    model_configs=mode_variants(_TWO_COLORS_RATE, cache_len=3 * 50 * 3),
    evaluation=EvalProtocol(setting="step_cap", values=(2100,), episodes=100, sample_actions=True,
                            target_return=56.5, metric="return", balance_key="is_red",
                            group_names=((1, "red"), (0, "green"))),
    # 1,500 windows: 47 updates of 32 per epoch; 50 epochs fit in 2 hours on one core with --bf16.
    train=TrainDefaults(epochs=50, batch_size=32, learning_rate=3e-4, weight_decay=1e-3, warmup_steps=100,
                        eval_values=(500,)),
    default_settings={"step_cap": 2100},
    action_names=("left", "right", "forward", "left+fwd", "right+fwd"),
    demo_step_cap=500,
    explain=_two_colors_explain,
    about=("A room whose acid floor drains health. A pillar, red or green, stands in the middle for the first "
           "45 steps only; items of both colours keep appearing. Items of the pillar's colour heal (+1 return), "
           "the others hurt; every step alive adds 0.02, and the episode ends when health runs out. Once the "
           "pillar is gone only memory says which colour to pick; DT's window is 150 steps."),
    aux_label="is_red",
    aux_values=(0, 1),
))


# ------------------------------------------------------------------------------ Memory Maze 9x9
def _memory_maze_env(step_cap: int = 1000, render_mode: str | None = None):
    from rate_core.envs.memory_maze import MemoryMazeEnv

    return MemoryMazeEnv(step_cap=step_cap, render_mode=render_mode)


def _memory_maze_vector_env(num_envs: int, step_cap: int = 1000, render_mode: str | None = None):
    from rate_core.envs.memory_maze import make_vector_env

    return make_vector_env(num_envs, step_cap=step_cap, render_mode=render_mode)


def _memory_maze_expert():
    # Explores until it has seen the current target (MemoryMazeExpert walks straight to targets it
    # never saw: actions nothing in an agent's history explains).
    from rate_core.envs.memory_maze import ExploringMemoryMazeExpert

    return ExploringMemoryMazeExpert()


def _memory_maze_teacher(**options):
    # The same behaviour, labelled with the noise-free expert's actions (collect --teacher).
    from rate_core.envs.memory_maze import MemoryMazeTeacher

    return MemoryMazeTeacher(**options)


def _memory_maze_explain(reset_info: dict) -> str:
    from rate_core.envs.memory_maze import TARGET_NAMES

    first = TARGET_NAMES[int(reset_info.get("target_index", 0))]
    return f"first target: {first} (the frame border shows the current one)"


# K = 30, N = 3 (90-step windows), d_model 64, 6 layers, 15 memory tokens, FFN off, and a
# Transformer-XL cache of the last 3 segments ((3K + 2m) * N = 360 positions), as the paper;
# 4 heads and a small encoder for two CPU cores.
_MEMORY_MAZE_RATE = ModelConfig(
    mode="rate", obs_kind="image", obs_shape=(3, 64, 64), act_dim=6, context_length=30, sections=3,
    d_model=64, n_layer=6, n_head=4, d_head=16, num_mem_tokens=15, mem_len=360, n_head_ca=2,
    conv_channels=(16, 32, 32),
    dropout=0.1, dropatt=0.0,
)

register(Task(
    name="memory_maze",
    title="Memory Maze 9x9",
    obs_kind="image",
    obs_shape=(3, 64, 64),
    act_dim=6,
    make_env=_memory_maze_env,
    make_vector_env=_memory_maze_vector_env,
    make_expert=_memory_maze_expert,
    make_teacher=_memory_maze_teacher,
    # Whole 1000-step episodes (returns-to-go over the whole episode, as the paper). 300 episodes
    # are 300k frames (3.7 GB of uint8 observations), about 30 minutes of collection with 2 workers.
    # Their seeds start at 1,000,000: the evaluator's mazes (seeds from 0) are not in the data.
    dataset_settings=({},),
    dataset_episodes=300,
    dataset_seed=1_000_000,
    model_configs=mode_variants(_MEMORY_MAZE_RATE, cache_len=_MEMORY_MAZE_RATE.mem_len),
    evaluation=EvalProtocol(setting="step_cap", values=(1000,), episodes=30, sample_actions=True,
                            target_return=18.1, metric="return", max_envs=10),
    # 300 episodes tile into 3,600 windows of 90 steps: 113 updates of 32 per epoch.
    train=TrainDefaults(epochs=30, batch_size=32, learning_rate=3e-4, weight_decay=1e-3, warmup_steps=100,
                        eval_values=(300,)),
    default_settings={"step_cap": 1000},
    action_names=("noop", "forward", "left", "right", "fwd+left", "fwd+right"),
    demo_step_cap=300,
    explain=_memory_maze_explain,
    about=("A 3D maze of 9x9 cells seen from the agent's eyes, with three coloured targets. The colour of "
           "the frame's border names the current target; touching it scores +1 and names another. In 1,000 "
           "steps, remembering where targets were seen (and the way there) scores more: our expert reaches "
           "about 27, the paper's RATE 7.64 and DT 6.83."),
    # Where the current target lies from the agent's heading (8 sectors): once out of view, only
    # memory of where it was seen and of the turns since tells (`train --aux-weight`).
    aux_label="target_bearing",
    aux_values=("ahead", "ahead-left", "left", "behind-left", "behind", "behind-right", "right", "ahead-right"),
    # Measured with Mesa's EGL on a 2-core host (2 worker processes): 2 envs hold 1.4 GB, 6 hold 2.7 GB,
    # 12 hold 4.1 GB, 30 hold 8.8 GB (resident, shared libraries counted in each process).
    env_memory_gb=0.3,
    worker_memory_gb=0.6,
))
