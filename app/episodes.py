"""What the app does, without the UI: load the chosen checkpoints, play the same seeded episode with
both, and turn the traces into videos, plots and a summary. Everything reads the task registry, so
a task with shipped checkpoints appears without app changes."""

import atexit
import functools
import json
import math
import numbers
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from rate_core.checkpoint import CheckpointError, load_checkpoint
from rate_core.hub import is_hub_reference, load_reference
from rate_core.model import ACTION_PAD, MemoryTransformer
from rate_core.rollout import EpisodeTrace, run_episodes
from rate_core.tasks import TASKS, Task, get_task

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_ROOT = ROOT / "assets" / "checkpoints"
OUTPUTS = Path(os.environ.get("RATE_APP_OUTPUTS") or ROOT / "outputs")  # app.py falls back to a temporary folder
VIDEO_ROOT = OUTPUTS / "videos"
MAX_VIDEO_FOLDERS = 48  # the newest runs' videos kept (and those of cached results): a long-lived server's disk
SHIPPED = "shipped: "  # prefix of the checkpoint choices that name a shipped folder
MODE_NAMES = {"rate": "RATE", "rmt": "RMT", "trxl": "TrXL", "dt": "DT"}
OVERLAY_HEIGHT = 48
MIN_VIDEO_WIDTH = 640
TARGET_RETURN_LIMIT = 10_000  # far beyond every task's returns; a huge one overflows the model (NaN probabilities)


class AppError(Exception):
    """A problem with the visitor's input, with a message that says what to do."""


# ------------------------------------------------------------------------------ checkpoints
def demo_tasks(root: Path = CHECKPOINT_ROOT) -> list[str]:
    """Registered tasks that have at least one shipped checkpoint, in registry order."""
    return [name for name in TASKS if any((root / name).glob("*/config.json"))]


def shipped_choices(task: str, root: Path = CHECKPOINT_ROOT) -> list[str]:
    """Checkpoint choices of a task: 'shipped: <folder>' for each folder under assets/checkpoints/<task>."""
    return [SHIPPED + path.parent.name for path in sorted((root / task).glob("*/config.json"))]


def default_pair(task: str, root: Path = CHECKPOINT_ROOT) -> tuple[str | None, str | None]:
    """(left, right) defaults: the shipped RATE and DT of the task, else the first two shipped."""
    choices = shipped_choices(task, root)
    left = SHIPPED + "rate" if SHIPPED + "rate" in choices else (choices[0] if choices else None)
    right = SHIPPED + "dt" if SHIPPED + "dt" in choices else (choices[-1] if choices else None)
    return left, right


def shipped_scores(task: str, root: Path = CHECKPOINT_ROOT) -> str:
    """A markdown table of what the task's shipped checkpoints score (their eval.json, written by
    `python -m training.evaluate`): a row per checkpoint, a column per evaluated setting ('–': not
    evaluated at that value)."""
    rows, settings, protocol = [], [], None
    for folder in sorted(path.parent for path in (root / task).glob("*/config.json")):
        try:
            evaluation = json.loads((folder / "eval.json").read_text())
            protocol, results = evaluation["protocol"], evaluation["results"]
            cells = {r[protocol["setting"]]: (f"{r['success_rate']:.2f}" if protocol["metric"] == "success" else
                                              f"{r['mean_return']:.2f} ± {r['return_sem']:.2f}") for r in results}
        except (OSError, ValueError, KeyError, TypeError):
            cells = None  # no evaluation, or not one this app reads
        rows.append((folder.name, cells))
        settings += [value for value in (cells or {}) if value not in settings]
    if protocol is None:
        return ""
    metric = "success rate" if protocol["metric"] == "success" else "mean return ± SEM"
    lines = [f"| checkpoint | {' | '.join(str(v) for v in settings)} |",
             "| --- " * (len(settings) + 1) + "|"]
    for name, cells in rows:
        values = [cells.get(v, "–") for v in settings] if cells else ["not evaluated"] + [""] * (len(settings) - 1)
        lines.append(f"| {name} | {' | '.join(values)} |")
    actions = "sampled" if protocol["sample_actions"] else "most likely"
    return (f"Shipped checkpoints, {metric} over {protocol['episodes']} episodes for each `{protocol['setting']}` "
            f"({actions} actions, `python -m training.evaluate`):\n\n" + "\n".join(lines))


def task_description(task: str, root: Path = CHECKPOINT_ROOT) -> str:
    """What the app says about a task: its title, what the agent must remember, and the shipped scores."""
    spec = get_task(task)
    return "\n\n".join(part for part in (f"### {spec.title}", spec.about, shipped_scores(task, root)) if part)


def checkpoint_path(choice: str, task: str, root: Path = CHECKPOINT_ROOT) -> Path:
    """Folder of a checkpoint choice: a shipped name or a local folder path."""
    choice = _choice_text(choice)
    local = local_paths_allowed()
    if not choice:
        raise AppError("choose a checkpoint: a shipped one from the list, "
                       + ("the path of a local checkpoint folder, " if local else "") + "or hf://USER/NAME")
    if choice.startswith(SHIPPED):  # only the task's own shipped folders (no path reaches elsewhere this way)
        if choice not in shipped_choices(task, root):
            raise AppError(f"{choice!r} is not a shipped checkpoint of {task}; the shipped ones: "
                           f"{', '.join(shipped_choices(task, root)) or 'none'}"
                           + (" (or give a folder's path)" if local else ""))
        return root / task / choice[len(SHIPPED):]
    if not local:
        raise AppError("this server plays its shipped checkpoints and hf://USER/NAME references only, not folders "
                       "on its disk")
    return Path(os.path.expanduser(choice))


def local_paths_allowed() -> bool:
    """Whether visitors may name checkpoint folders on the server's disk: RATE_APP_LOCAL_PATHS=0 for a
    public server (no looking around its files), =1 to allow them; unset, allowed except on a Hugging
    Face Space (SPACE_ID set), which is public."""
    setting = os.environ.get("RATE_APP_LOCAL_PATHS")
    if setting is None:
        return "SPACE_ID" not in os.environ
    return setting != "0"


def _choice_text(choice) -> str:
    """A checkpoint choice as text; AppError for a value that is not text (the API takes anything)."""
    if choice is not None and not isinstance(choice, str):
        raise AppError(f"a checkpoint choice is text (shipped: NAME, a folder's path or hf://USER/NAME), "
                       f"got {choice!r}")
    return (choice or "").strip()


_models: OrderedDict = OrderedDict()  # loaded models, the least recently used dropped beyond MODELS_KEPT
_models_lock = threading.Lock()  # held only to look up or add an entry, never while a model loads
_loading: dict = {}  # key -> the lock of that key's load
MODELS_KEPT = 16


def _remember(key, load) -> MemoryTransformer:
    """_models[key], loaded by load() if missing. Two runs that want the same model load it once; a run
    that wants another model does not wait for this load (an hf:// download can take minutes)."""
    def cached():
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        return None

    with _models_lock:
        model = cached()
        if model is not None:
            return model
        loading = _loading.setdefault(key, threading.Lock())
    with loading:
        with _models_lock:
            model = cached()
        if model is not None:  # loaded by the run this one waited for
            return model
        model = load()
        with _models_lock:
            _models[key] = model
            while len(_models) > MODELS_KEPT:
                _models.popitem(last=False)
            _loading.pop(key, None)
        return model


def files_stamp(folder: Path) -> tuple:
    """Name, modification time and size of each file in folder: what changes when a checkpoint is
    written again in place (() where the folder cannot be read)."""
    try:
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.glob("*")) if p.is_file())
    except OSError:
        return ()


def load_model(choice: str, task: str, root: Path = CHECKPOINT_ROOT) -> MemoryTransformer:
    """The model of a checkpoint choice for `task` (shipped, a folder, or hf://USER/NAME), cached
    while its files do not change. AppError for anything that keeps it from playing `task`."""
    choice = _choice_text(choice)
    if is_hub_reference(choice):  # through MemoryTransformer.from_pretrained (the Hub cache when offline)
        try:
            return _fitting(_remember((choice, task), lambda: load_reference(choice, task=task).eval()), task)
        except CheckpointError as error:
            raise AppError(str(error)) from None
    path = checkpoint_path(choice, task, root)
    try:
        if not path.exists():
            raise AppError(f"checkpoint folder {path} does not exist: pick a shipped checkpoint or give the path of "
                           f"a folder with config.json and model.safetensors")
        key = (str(path.resolve()), task, files_stamp(path))
        return _fitting(_remember(key, lambda: load_checkpoint(path, task=task).eval()), task)
    except CheckpointError as error:
        raise AppError(str(error)) from None
    except (OSError, ValueError) as error:  # e.g. a path too long for the file system
        shown = str(path) if len(str(path)) <= 200 else f"{str(path)[:200]}... ({len(str(path))} characters)"
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise AppError(f"cannot read checkpoint folder {shown}: {reason}") from None


def _fitting(model: MemoryTransformer, task: str) -> MemoryTransformer:
    """model, if its observations and actions are those of task's env (a checkpoint's config can say
    any task); AppError otherwise."""
    spec, config = get_task(task), model.config
    if tuple(config.obs_shape) != tuple(spec.obs_shape) or config.act_dim != spec.act_dim:
        raise AppError(f"this checkpoint says it is for {task}, but its model takes observations "
                       f"{tuple(config.obs_shape)} and {config.act_dim} actions where {spec.title} has "
                       f"{tuple(spec.obs_shape)} and {spec.act_dim}: use a checkpoint trained on {spec.title}")
    return model


# ------------------------------------------------------------------------------- episodes
@dataclass
class EpisodeRequest:
    """One side-by-side run, validated."""

    task: Task
    settings: dict
    seed: int
    target_return: float
    step_cap: int | None
    sample: bool
    memory_horizon: int | None = None
    """segments that RATE, RMT and TrXL may remember, the current one included (None: all; DT: its window)"""

    def horizon_for(self, model: MemoryTransformer) -> int | None:
        """The memory horizon this model plays with: none for DT, whose window is fixed."""
        return None if model.config.mode == "dt" else self.memory_horizon


def make_request(task_name: str, seed, setting_value, target_return, step_cap, sample: bool,
                 memory_horizon=0) -> EpisodeRequest:
    """Check the visitor's settings; AppError says which one is wrong and what is allowed."""
    try:
        task = get_task(task_name)
    except KeyError:
        raise AppError(f"unknown task {task_name!r}; choose one of: {', '.join(demo_tasks())}") from None
    for name, value in (("seed", seed), ("setting", setting_value), ("target return", target_return),
                        ("step cap", step_cap), ("memory horizon", memory_horizon)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise AppError(f"{name} must be a number, got {value!r}")
    if not isinstance(sample, (bool, np.bool_)):
        raise AppError(f"sample actions must be true or false, got {sample!r}")
    settings = dict(task.default_settings)
    spec = task.demo_setting
    if spec is not None:
        value = spec.default if setting_value is None else setting_value
        if not spec.allows(value):
            raise AppError(f"{spec.label} must be {spec.described()}, got {value}")
        settings[spec.name] = int(value)
    seed = 0 if seed is None else seed  # an empty box is its default, as for every box
    if not float(seed).is_integer() or not 0 <= seed < 2**31:
        raise AppError(f"seed must be a whole number from 0 to {2**31 - 1}, got {seed}")
    target = task.evaluation.target_return if target_return is None else float(target_return)
    if not abs(target) <= TARGET_RETURN_LIMIT:  # NaN too
        raise AppError(f"target return must be a number from {-TARGET_RETURN_LIMIT} to {TARGET_RETURN_LIMIT} "
                       f"(this task is evaluated at {task.evaluation.target_return:g}), got {target:g}")
    cap = None
    step_cap = task.demo_step_cap if step_cap is None else step_cap  # an empty box: the task's default
    if step_cap not in (None, 0):
        if not float(step_cap).is_integer() or not 1 <= step_cap <= 100_000:
            raise AppError(f"step cap must be a whole number from 1 to 100000 (0: play to the end), got {step_cap}")
        cap = int(step_cap)
    horizon = None
    if memory_horizon not in (None, 0):
        if not float(memory_horizon).is_integer() or not 1 <= memory_horizon <= 10_000:
            raise AppError(f"memory horizon must be a whole number of segments from 1 to 10000 (0: the whole "
                           f"episode), got {memory_horizon}")
        horizon = int(memory_horizon)
    return EpisodeRequest(task, settings, int(seed), target, cap, bool(sample), horizon)


class EnvPool:
    """One-env vector envs kept between runs, so that a run need not make its own: a Memory Maze
    env takes about 2.5 s to make (a worker process that imports MuJoCo) and 0.4 s to close, as long
    as a 300-step episode's stepping. Only envs that took at least `slow_seconds` to make are kept
    (the other tasks' take 0.2 s or less), at most `limit` idle ones, the oldest closed first. An
    env serves one run at a time; a reset with the run's seed fixes its whole episode, so a kept env
    plays what a new one would. Thread-safe."""

    def __init__(self, limit: int = 2, slow_seconds: float = 0.5):
        self.limit, self.slow_seconds = limit, slow_seconds
        self._idle: list[tuple[tuple, object]] = []  # (key, env), oldest first
        self._lock = threading.Lock()

    @contextmanager
    def env(self, task: Task, settings: dict):
        """A vector env of one `task` env made with `settings` and rendering frames: a kept one if
        there is one, else a new one (AppError if the env refuses the settings). Kept afterwards if
        the run ended or was stopped between steps (EpisodeCancelled); closed after any other error."""
        key = (task.name, tuple(sorted(settings.items())))
        env = self._take(key)
        keep = env is not None
        if env is None:
            start = time.perf_counter()
            try:
                env = task.make_vector_env(1, render_mode="rgb_array", **settings)
            except ValueError as error:  # a setting the environment refuses (e.g. an even Minigrid size)
                raise AppError(f"{task.title}: {error}") from None
            keep = time.perf_counter() - start >= self.slow_seconds
        try:
            yield env
        except EpisodeCancelled:  # stopped between steps: the env is fine
            self._release(key, env, keep)
            raise
        except BaseException:
            env.close()
            raise
        self._release(key, env, keep)

    def _take(self, key: tuple):
        with self._lock:
            found = [i for i, (k, _) in enumerate(self._idle) if k == key]
            env = self._idle.pop(found[-1])[1] if found else None
        if env is not None and not getattr(env, "workers_alive", lambda: True)():  # e.g. killed while idle
            env.close()
            return None
        return env

    def _release(self, key: tuple, env, keep: bool) -> None:
        if not keep:
            env.close()
            return
        with self._lock:
            self._idle.append((key, env))
            surplus = self._idle[:max(0, len(self._idle) - self.limit)]
            del self._idle[:len(surplus)]
        for _, old in surplus:
            old.close()

    def close(self) -> None:
        """Close every idle env (the app calls this at exit)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for _, env in idle:
            env.close()


ENV_POOL = EnvPool()
atexit.register(ENV_POOL.close)


def play(model: MemoryTransformer, request: EpisodeRequest, progress=None) -> EpisodeTrace:
    """One traced episode with rendered frames, in an env from ENV_POOL."""
    with ENV_POOL.env(request.task, request.settings) as env:
        batch = run_episodes(model, env, [request.seed], request.target_return, sample=request.sample,
                             sample_seed=request.seed, max_steps=request.step_cap, progress=progress, trace=True,
                             frames=True, observations=request.task.counterfactual is not None,
                             memory_horizon=request.horizon_for(model))
    return batch.traces[0]


_threads_lock = threading.Lock()
_pairs_playing = 0  # play_pair calls under way (the app plays up to two runs at once)
_threads_outside_pairs = 1


@contextmanager
def shared_threads(ways: int):
    """torch's intra-op threads (process-wide) shared out among `ways` models playing at once, and
    given back when the last pair playing ends. Each model's thread using all of them makes a pair
    on 2 cores take twice as long as the two episodes one after the other (T-Maze at T = 600: 10.9 s
    against 4.7 s; ViZDoom-Two-Colors 8.6 against 4.4), where the shared threads give 5.0 and 4.6."""
    global _pairs_playing, _threads_outside_pairs
    with _threads_lock:
        if _pairs_playing == 0:
            _threads_outside_pairs = torch.get_num_threads()
            torch.set_num_threads(max(1, _threads_outside_pairs // ways))
        _pairs_playing += 1
    try:
        yield
    finally:
        with _threads_lock:
            _pairs_playing -= 1
            if _pairs_playing == 0:
                torch.set_num_threads(_threads_outside_pairs)


class EpisodeCancelled(Exception):
    """An episode stopped before its end because its caller gave up on it (play_pair)."""


def play_pair(models: list[MemoryTransformer], request: EpisodeRequest, progress=None,
              poll_seconds: float = 0.25) -> list[EpisodeTrace]:
    """play() with each model at once, in two threads sharing torch's threads (shared_threads): each
    env steps in its own process (Memory Maze, ViZDoom) or loop, and the models' inference releases
    the GIL, so a Memory Maze pair of 300 steps takes about 5 s on 2 cores (envs kept by ENV_POOL)
    instead of 9 s one after the other, and the other tasks' pairs no longer than those. The
    episodes are those play() gives (actions are drawn from per-episode streams). progress: optional
    callable([left step, right step]), called from this thread (where a UI's progress tracker lives)
    every poll_seconds; an exception it raises stops both episodes at their next step and is raised
    here."""
    steps = [0] * len(models)
    cancelled = threading.Event()

    def run(index: int) -> EpisodeTrace:
        def report(step: int) -> None:
            if cancelled.is_set():
                raise EpisodeCancelled(f"stopped at step {step}")
            steps[index] = step
        return play(models[index], request, report)

    with shared_threads(len(models)), ThreadPoolExecutor(len(models), thread_name_prefix="play") as pool:
        futures = [pool.submit(run, index) for index in range(len(models))]
        try:
            while wait(futures, timeout=poll_seconds).not_done:
                if progress is not None:
                    progress(list(steps))
        except BaseException:  # e.g. the app's warm-up giving the cores to a visitor: the episodes stop too
            cancelled.set()
            raise
        return [future.result() for future in futures]  # an episode's error (e.g. AppError) is raised here


@torch.no_grad()
def last_step_probs(model: MemoryTransformer, trace: EpisodeTrace, observations: np.ndarray) -> np.ndarray:
    """Action probabilities (A,) at the last step of the episode replayed with these observations and
    the trace's actions and returns-to-go (teacher forcing: segment by segment as in training, from
    the first segment its memory horizon reaches, or DT's last window)."""
    steps = trace.length
    device = next(model.parameters()).device
    rtg = torch.as_tensor(trace.returns_to_go, device=device)[None]
    obs = torch.as_tensor(observations[:steps], device=device)[None]
    actions = torch.as_tensor(trace.actions, device=device)[None].clone()
    actions[:, -1] = ACTION_PAD  # the action being chosen is not known yet
    k = model.config.segment_steps
    if model.config.mode == "dt":
        logits = model.last_step_logits(rtg[:, -k:], obs[:, -k:], actions[:, -k:])
    else:
        state = None
        last = (steps - 1) // k * k  # the last step's segment
        first = 0 if trace.memory_horizon is None else max(0, last - (trace.memory_horizon - 1) * k)
        for start in range(first, steps, k):
            seg = slice(start, start + k)
            out, state = model(rtg[:, seg], obs[:, seg], actions[:, seg], state)
        logits = out[:, -1]
    return logits.float().softmax(-1)[0].cpu().numpy()


def what_if(traces: list[EpisodeTrace], models: list[MemoryTransformer], task: Task) -> list[dict] | None:
    """Per agent, the last step's action probabilities as played and with the task's counterfactual
    observations (e.g. the other cue); None when the task has no counterfactual."""
    if task.counterfactual is None or any(t.observations is None for t in traces):
        return None
    return [{"played": trace.probs[-1],
             "flipped": last_step_probs(model, trace, task.counterfactual(trace.observations))}
            for trace, model in zip(traces, models, strict=True)]


def agent_name(model: MemoryTransformer, side: str) -> str:
    return f"{MODE_NAMES.get(model.config.mode, model.config.mode)} ({side})"


def outcome(trace: EpisodeTrace, model: MemoryTransformer, task: Task) -> dict:
    """The JSON summary of one agent's episode."""
    steps = trace.length
    result = {
        "mode": model.config.mode, "steps": steps, "return": round(trace.total_return, 4),
        "segments": math.ceil(steps / model.config.context_length) if model.config.mode != "dt" else None,
        "memory_updates": len(trace.memory_update_steps), "memory_horizon": trace.memory_horizon,
        "stopped_by_step_cap": trace.cut_short,
    }
    if task.evaluation.metric == "success":
        result["success"] = trace.success
    return result


# ---------------------------------------------------------------------------------- video
@functools.lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def end_verdict(trace: EpisodeTrace) -> str:
    """How an episode ended, in words: success or failed where the env says, stopped by the step cap
    before it ended (no verdict: the agent had not finished), else episode over."""
    if trace.success:
        return "success"
    if trace.cut_short:
        return "stopped by the step cap"
    return "failed" if "success" in trace.info else "episode over"


def frame_text(trace: EpisodeTrace, t: int, task: Task, name: str, memory: bool) -> tuple[str, str, bool]:
    """The two lines under the frame before step t (t = T: after the last step), and whether a segment
    begins there: the step's action, reward, return so far and target return left (or how the episode
    ended), then the segment (or DT's window)."""
    k = trace.segment_steps
    done_return = float(trace.rewards[:t].sum())
    if t < trace.length:
        action = int(trace.actions[t])
        action_name = task.action_names[action] if action < len(task.action_names) else str(action)
        reward = float(trace.rewards[t])
        line = (f"{name}   step {t}   action {action_name} (p={trace.probs[t, action]:.2f})   reward {reward:g}   "
                f"return {done_return:g}   target left {trace.returns_to_go[t]:g}")
    else:
        line = f"{name}   {end_verdict(trace)} after {trace.length} steps   return {done_return:g}"
    segment = min(t, trace.length - 1) // k  # the frame after the last step shows the last segment played
    begins = memory and t % k == 0 and 0 < t < trace.length
    if begins:
        horizon = trace.memory_horizon
        if horizon is None:
            reach = f"memory updated from the last {k} steps"
        elif horizon == 1:
            reach = "memory reset (memory horizon 1)"
        else:
            reach = f"memory rebuilt from the last {(horizon - 1) * k} steps only (memory horizon {horizon})"
        note = f"segment {segment + 1} begins: {reach}"
    else:
        note = f"segment {segment + 1} (K = {k} steps)" if memory else f"window of the last {k} steps"
    return line, note, begins


def annotate(frame: np.ndarray, trace: EpisodeTrace, t: int, task: Task, name: str, memory: bool) -> np.ndarray:
    """The frame before step t (t = T: after the last step) with a strip of text under it (frame_text);
    a yellow mark when a segment begins."""
    frame_height, frame_width = frame.shape[:2]
    # at least 640 wide for the text, and sizes divisible by 16 for H.264
    width = max(MIN_VIDEO_WIDTH, -(-frame_width // 16) * 16)
    height = -(-(frame_height + OVERLAY_HEIGHT) // 16) * 16 - OVERLAY_HEIGHT
    image = Image.new("RGB", (width, height + OVERLAY_HEIGHT), (16, 18, 22))
    image.paste(Image.fromarray(frame), ((width - frame_width) // 2, 0))
    draw = ImageDraw.Draw(image)
    line, note, begins = frame_text(trace, t, task, name, memory)
    draw.text((8, height + 6), line, fill=(235, 235, 235), font=_font(15))
    if begins:
        draw.rectangle((0, height, width, height + 3), fill=(250, 210, 40))
    image.paste(_text_strip(note, (250, 210, 40) if begins else (150, 150, 150), width), (0, height + 27))
    return np.asarray(image)


@functools.lru_cache(maxsize=64)
def _text_strip(text: str, colour: tuple, width: int):
    """A rendered line of small text (the second overlay line repeats a lot: render it once)."""
    strip = Image.new("RGB", (width, 18), (16, 18, 22))
    ImageDraw.Draw(strip).text((8, 0), text, fill=colour, font=_font(12))
    return strip


def write_video(frames: list[np.ndarray], path: Path, fps: int, check: Callable[[], None] | None = None) -> Path:
    """H.264 MP4 (yuv420p) that browsers play; written to a temporary name, then renamed. x264's
    veryfast preset encodes a 300-step Memory Maze video in half the time of its default (0.49 s
    against 0.99 s here) at the same size and nearly the same error (1.91 levels against 1.80).
    check: called before each frame; what it raises stops the writing (the app shutting down), and
    the partial file is deleted."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    stopped = None
    with imageio.get_writer(partial, fps=fps, codec="libx264", quality=7, macro_block_size=16,
                            pixelformat="yuv420p", ffmpeg_log_level="error",
                            output_params=["-preset", "veryfast"]) as writer:
        for frame in frames:
            try:
                if check is not None:
                    check()
            except BaseException as error:  # the writer closes normally, waiting for ffmpeg: an exception
                stopped = error  # through it would kill ffmpeg, which might then still create the file
                break
            writer.append_data(frame)
    if stopped is not None:
        partial.unlink(missing_ok=True)
        raise stopped
    partial.replace(path)
    return path


def prune_videos(keep=(), root: Path | None = None, limit: int = MAX_VIDEO_FOLDERS) -> int:
    """Delete the oldest episode folders under root (default VIDEO_ROOT) beyond the newest `limit`,
    except those in `keep` (the folders of results the app still serves). Returns how many went."""
    root = VIDEO_ROOT if root is None else root
    kept = {Path(folder).resolve() for folder in keep}
    try:
        folders = sorted(root.glob("episode_*"), key=lambda folder: folder.stat().st_mtime, reverse=True)
    except OSError:  # a folder deleted meanwhile (another run pruning): next time
        return 0
    gone = [folder for folder in folders[limit:] if folder.resolve() not in kept]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return len(gone)


def video_fps(steps: int) -> int:
    """30 frames per second, faster for long episodes so that a video lasts at most ~20 s."""
    return int(min(120, max(30, math.ceil(steps / 20))))


def episode_videos(traces: list[EpisodeTrace], models: list[MemoryTransformer], names: list[str], task: Task,
                   folder: Path | None = None, check: Callable[[], None] | None = None) -> list[Path]:
    """One video per agent, with the same number of frames and frame rate (a shorter episode holds
    its last frame). check: called before each frame is drawn and encoded, from this thread and the
    encoders'; what it raises stops the videos (the app shutting down), the first such error raised
    here once both encoders have stopped, and the folder made for them is deleted."""
    check = check or (lambda: None)
    made = folder is None
    if made:
        VIDEO_ROOT.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="episode_", dir=VIDEO_ROOT))
    count = max(len(trace.frames) for trace in traces)
    fps = video_fps(count)
    jobs = []
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:  # the encoders are ffmpeg processes: encode both at once
            for side, trace, model, name in zip(("left", "right")[: len(traces)], traces, models, names, strict=True):
                memory = model.config.num_mem_tokens > 0 or model.config.mem_len > 0
                frames = []
                for t, frame in enumerate(trace.frames):
                    check()
                    frames.append(annotate(frame, trace, t, task, name, memory))
                frames += [frames[-1]] * (count - len(frames))
                jobs.append(pool.submit(write_video, frames, folder / f"{side}.mp4", fps, check))
            return [job.result() for job in jobs]
    except BaseException:
        if made:  # the pair's folder goes with it (one video of a pair is no result)
            shutil.rmtree(folder, ignore_errors=True)
        raise
