"""The demo page: a RATE agent and a Decision Transformer play the same seeded episode side by side,
and a look inside RATE's memory. Tasks and checkpoints come from the registry and assets/."""

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np

from app import plots
from app.episodes import (CHECKPOINT_ROOT, SHIPPED, AppError, EpisodeRequest, agent_name, checkpoint_path,
                          default_pair, demo_tasks, episode_videos, files_stamp, load_model, local_paths_allowed,
                          make_request, outcome, play_pair, prune_videos, shipped_choices, task_description, what_if)
from rate_core.checkpoint import CheckpointError, read_checkpoint_config
from rate_core.envs.subproc import EnvsStopped
from rate_core.model import MemoryTransformer
from rate_core.paper import PAPER_PARAMETER_COUNTS, PAPER_TASKS, paper_config
from rate_core.tasks import get_task

INTRO = """# RATE: Recurrent Action Transformer with Memory
RATE reads a long episode in **segments** of K steps and carries what matters from one segment to
the next in a few **memory tokens**. A Decision Transformer (DT) only sees a fixed window of recent
steps. Every task here hides something the agent must remember long after it was shown; the text under
the task says what. Pick a task and press **Run**: both agents play the same episode, left and right,
and below the videos you see what RATE's memory held."""

PANELS = 5  # figures in the memory panel
PLAYING = "Playing "  # how the outcome line begins while a run plays
RESULT_CACHE: OrderedDict = OrderedDict()  # request -> outputs, for the shipped checkpoints (examples, first visit)
RESULT_CACHE_SIZE = 32  # the oldest result goes beyond this (its videos then go with prune_videos)
_IN_FLIGHT: dict = {}  # request -> threading.Event set when the run playing it ends (cached or failed)
_visits = 0  # visitors' runs playing now (not those served from the cache or waiting for a run of their request)
_runs = 0  # runs playing now, the warm-up's included
_cache_lock = threading.Lock()
_runs_done = threading.Condition(_cache_lock)  # notified as each run ends


class WarmUpYields(Exception):
    """A visitor's run started while the warm-up played an example: the warm-up stops it, to play it later."""


class AppClosing(Exception):
    """The app is shutting down (CLOSING is set): the warm-up and visitors' runs stop where they are,
    rather than the exit waiting for them to play to the end."""


CLOSING = threading.Event()  # set by app.py once the server has stopped (Ctrl-C, SIGTERM)
ERROR_GRACE_SECONDS = 2.0  # how long a failed warm-up example waits for CLOSING before it says it failed


class RunSuperseded(Exception):
    """The page that asked for this run pressed Run again or chose another task: the run stops, unshown."""


class PageRuns:
    """The runs of one open page: only the run of its latest Run press, and only while the page shows
    that run's task, plays on and is shown; an older one stops at its next progress report, or as it
    starts if it waited in the queue behind other visitors' runs."""

    def __init__(self, task: str | None):
        self.task = task  # the task the page shows
        self.generation = 0  # the number of the page's latest Run press
        self._lock = threading.Lock()

    def press(self, task: str) -> int:
        """Run pressed: the run playing, if any, stops now, even if the new one waits in the queue.
        Returns the press's number, which its run carries (run_started hands it on to run_episodes)."""
        with self._lock:
            self.generation += 1
            self.task = task
            return self.generation

    def superseded(self, number: int, task: str) -> bool:
        return number != self.generation or task != self.task


_pages: dict[str, PageRuns] = {}  # session of an open page -> its runs (API clients have none)


def _page(request, task: str | None = None) -> PageRuns | None:
    """The runs of the page that sent `request`, registered with `task` if given; None for a call
    without a page (the API, tests): nothing supersedes those runs."""
    session = getattr(request, "session_hash", None)
    if session is None:
        return None
    with _cache_lock:
        if task is not None and session not in _pages:
            _pages[session] = PageRuns(task)
        return _pages.get(session)


def _warm_up_progress(*args, **kwargs) -> None:
    """The warm-up's progress callback: it stops the example as soon as a visitor's run needs the cores,
    or the app is shutting down."""
    if CLOSING.is_set():
        raise AppClosing
    if _visits:
        raise WarmUpYields


def shipped_checkpoints(root: Path = CHECKPOINT_ROOT) -> list[list[str]]:
    """Rows of (task, mode, folder, status) for every checkpoint folder under root."""
    rows = []
    for config_path in sorted(root.glob("*/*/config.json")):
        folder = config_path.parent
        try:
            config = read_checkpoint_config(folder)
            rows.append([config.get("task", "?"), config["model_config"].mode, str(folder.relative_to(root)), "ok"])
        except CheckpointError as error:
            rows.append(["?", "?", str(folder.relative_to(root)), f"unusable: {error}"])
    return rows


def describe(task: str, mode: str) -> tuple[str, dict]:
    """A one-paragraph description and the config of the paper's model for task in mode."""
    config = paper_config(task, mode)
    count = MemoryTransformer(config).num_parameters()
    paper = PAPER_PARAMETER_COUNTS.get((task, mode))
    paper_text = f" (the paper reports {paper:,})" if paper else ""
    text = (f"**{task} / {mode}**: {config.n_layer} layers of width {config.d_model}, "
            f"{config.num_mem_tokens} memory tokens, a Transformer-XL cache of {config.mem_len} tokens, "
            f"segments of {config.segment_steps} steps: {count:,} parameters{paper_text}.")
    return text, vars(config)


# ------------------------------------------------------------------------------ callbacks
def run_episodes(task: str, left: str, right: str, seed: float, setting: float, target_return: float,
                 step_cap: float, sample: bool, memory_horizon: float = 0, press: int | None = None,
                 request: gr.Request = None, progress=gr.Progress()):
    """Play the same seeded episode with the left and the right checkpoint.
    Returns the two videos, a JSON summary per agent, and the traces for the memory panel; for a
    run of a page that has since pressed Run again or chosen another task, no update (gr.skip()).
    press: the number of the page's Run press this run answers (PageRuns.press; None: the latest).
    Bad input: a page gets no videos and the message for its outcome line (outcome_line), with no
    error toast or "Error" badges; an API call gets gr.Error, as it does when the app shuts down
    under its run. The background warm-up gives way to a visitor's run (warm_cache)."""
    page = _page(request)
    number = (page.generation if press is None else press) if page else None

    def superseded() -> bool:
        return page is not None and page.superseded(number, task)

    if superseded():  # pressed again while this run waited in the queue: it does not start
        return [gr.skip()] * 4

    def report(*args, **kwargs):
        if superseded():
            raise RunSuperseded
        if CLOSING.is_set():
            raise AppClosing
        progress(*args, **kwargs)

    try:
        result = _cached_run(task, left, right, seed, setting, target_return, step_cap, sample, memory_horizon,
                             report, visitor=True)
    except (RunSuperseded, AppClosing):
        if page is None:  # an API caller would otherwise get no videos and no reason
            raise gr.Error("the app is shutting down and stopped this run; call again once it is back",
                           print_exception=False) from None
        result = None
    except AppError as error:
        print(f"run refused: {error}")  # one line in the server's log: the visitor's input, not a fault
        if page is None:
            raise gr.Error(str(error), duration=None, print_exception=False) from None
        result = [None, None, None, {"refused": str(error)}]
    if result is None or superseded():
        return [gr.skip()] * 4
    if page is not None:  # the panel shows it only while the page still shows this run (_stale)
        result = [*result[:3], {**result[3], "task": task, "press": number}]
    return result


def run_api(task: str, left: str | None = None, right: str | None = None, seed: float | None = 0,
            setting: float | None = None, target_return: float | None = None, step_cap: float | None = None,
            sample: bool | None = None, memory_horizon: float | None = 0, progress=gr.Progress()):
    """The API's run (/run_episodes): run_episodes for a caller with no page, where any argument left
    out (None) is the chosen task's default, as the page fills in when a visitor picks the task (the
    shipped RATE and DT, the task's setting, target return, step cap and action choice). Returns the
    two videos and the summary."""
    if task not in demo_tasks():
        raise gr.Error(f"unknown task {task!r}; choose one of: {', '.join(demo_tasks())}", print_exception=False)
    if sample is not None and not isinstance(sample, bool):
        raise gr.Error(f"sample must be true or false (or left out: the task's choice), got {sample!r}",
                       print_exception=False)
    given = [task, left, right, seed, setting, target_return, step_cap, sample, memory_horizon]
    values = [default if value is None else value for value, default in zip(given, default_inputs(task), strict=True)]
    return run_episodes(*values, request=None, progress=progress)[:3]


def _cached_run(task: str, left: str, right: str, seed: float, setting: float, target_return: float,
                step_cap: float, sample: bool, memory_horizon: float, progress, visitor: bool = False):
    """run_episodes through RESULT_CACHE (shipped checkpoints) and _IN_FLIGHT; visitor: a visitor's run
    (counted in _visits while it plays), not the warm-up's. Raises AppError for bad input, and what
    progress raises (it is called at least every 0.25 s, also while waiting for the same run)."""
    request = make_request(task, seed, setting, target_return, step_cap, sample, memory_horizon)
    if not all(str(choice).startswith(SHIPPED) for choice in (left, right)):  # files may change: no cache
        with _playing(visitor):
            return _play_and_render(request, left, right, progress)
    # the run as played: a setting the task does not have (the hidden box keeps another task's value) is not in it;
    # and the checkpoints' files as they are (a shipped checkpoint written again in place is another model)
    try:
        stamps = tuple(files_stamp(checkpoint_path(choice, request.task.name)) for choice in (left, right))
    except AppError:  # not a shipped checkpoint of this task: _play_and_render says so
        stamps = ()
    key = (request.task.name, left, right, stamps, request.seed, tuple(sorted(request.settings.items())),
           request.target_return, request.step_cap, request.sample, request.memory_horizon)
    while True:
        with _cache_lock:
            if key in RESULT_CACHE:
                RESULT_CACHE.move_to_end(key)  # the least recently asked for goes first (the first run's stays)
                return RESULT_CACHE[key]
            running = _IN_FLIGHT.get(key)
            if running is None:  # this call plays it (and caches it) while others wait for it
                _IN_FLIGHT[key] = threading.Event()
                break
        # e.g. the background warm-up is playing this very example: wait, do not play it twice; if that run
        # fails (or the warm-up gives it up), one of those waiting plays it, the others wait for that one
        while not running.wait(0.25):
            progress(None, desc="this run is being played already (the app's examples warm up at start): waiting")
    try:
        with _playing(visitor):
            result = _play_and_render(request, left, right, progress)
        with _cache_lock:
            RESULT_CACHE[key] = result
            while len(RESULT_CACHE) > RESULT_CACHE_SIZE:
                RESULT_CACHE.popitem(last=False)
        return result
    finally:
        with _cache_lock:
            _IN_FLIGHT.pop(key).set()


@contextmanager
def _playing(visitor: bool):
    """Counts a run in _runs while it plays (its envs made, played and given back, its videos written),
    a visitor's in _visits too."""
    global _visits, _runs
    with _cache_lock:
        _visits += visitor
        _runs += 1
    try:
        yield
    finally:
        with _cache_lock:
            _visits -= visitor
            _runs -= 1
            _runs_done.notify_all()


def wait_for_runs(timeout: float) -> bool:
    """Wait until no run plays (the warm-up's or a visitor's), at most `timeout` seconds: True if none
    does. app.py waits for the runs CLOSING stops before it exits, so that their envs (a ViZDoom engine,
    a Memory Maze worker) and video encoders end with them."""
    with _cache_lock:
        return _runs_done.wait_for(lambda: _runs == 0, timeout)


def _stop_if_closing() -> None:
    """AppClosing once the app is shutting down: checked before each video frame (encoder threads
    call it too, so it does not use the run's progress, which belongs to the request's thread)."""
    if CLOSING.is_set():
        raise AppClosing


def _play_and_render(request: EpisodeRequest, left: str, right: str, progress):
    """run_episodes without its cache. AppError naming the agent for a checkpoint that cannot play (both
    agents', where both cannot)."""
    models, refused = [], []
    for side, choice in (("left", left), ("right", right)):
        try:
            models.append(load_model(choice, request.task.name))
        except AppError as error:
            refused.append(f"{side} agent: {error}")
    if refused:
        raise AppError("  \n".join(refused))
    names = [agent_name(models[0], "left"), agent_name(models[1], "right")]
    limit = min(filter(None, (request.step_cap, request.task.episode_limit(request.settings))), default=None)

    def report(steps):
        progress((min(steps), limit) if limit else None,
                 desc=", ".join(f"{name}: step {step}" for name, step in zip(names, steps, strict=True)))

    try:
        traces = play_pair(models, request, report)
    except EnvsStopped:  # app.py stopped its env workers while they started: the app is shutting down
        raise AppClosing from None
    progress(None, desc="writing videos")
    videos = episode_videos(traces, models, names, request.task, check=_stop_if_closing)
    with _cache_lock:
        served = [Path(result[0]).parent for result in RESULT_CACHE.values()]
    prune_videos(keep=[*served, videos[0].parent])
    summary = {"task": request.task.name, "seed": request.seed, "settings": request.settings,
               "app_step_cap": request.step_cap, "target_return": request.target_return,
               "sampled_actions": request.sample, "memory_horizon": request.memory_horizon,
               "info": traces[0].reset_info,
               "left": {"checkpoint": left, **outcome(traces[0], models[0], request.task)},
               "right": {"checkpoint": right, **outcome(traces[1], models[1], request.task)}}
    for trace in traces:  # the panel does not need the pictures again
        trace.frames = None
    panel_input = {"traces": traces, "names": names, "task": request.task.name, "summary": summary,
                   "title": run_title(request), "what_if": what_if(traces, models, request.task)}
    return str(videos[0]), str(videos[1]), summary, panel_input


def plural(number: int, word: str) -> str:
    """'1 segment', '2 segments'."""
    return f"{number} {word}{'s' * (number != 1)}"


def _setting_name(spec) -> str:
    """The setting's label without its unit or hint ("corridor length T (steps)": "corridor length T")."""
    return spec.label.split(" (")[0]


def run_title(request: EpisodeRequest) -> str:
    """The run in words, for the outcome line: the task, seed, setting, how many steps, target return,
    how actions are chosen and the memory horizon."""
    task, spec = request.task, request.task.demo_setting
    words = [f"seed {request.seed}"]
    words += [f"{_setting_name(spec) if spec and name == spec.name else name} = {value}"
              for name, value in request.settings.items() if name != "step_cap"]
    limit = request.task.episode_limit(request.settings) if "step_cap" in request.settings else None
    if request.step_cap and (limit is None or request.step_cap < limit):
        words.append(f"the first {request.step_cap} steps" + (f" of at most {limit}" if limit else ""))
    elif limit:
        words.append(f"at most {limit} steps")
    words.append(f"target return {request.target_return:g}")
    words.append("sampled actions" if request.sample else "the most likely actions")
    if request.memory_horizon:
        words.append(f"memory horizon {plural(request.memory_horizon, 'segment')}")
    return f"**{task.title}**: {', '.join(words)}"


def _verdict(side: dict) -> str:
    parts = []
    cut_short = side.get("stopped_by_step_cap", False)
    if "success" in side:  # an episode the cap stopped before it ended has no verdict yet
        parts.append("**success**" if side["success"] else "**not finished**" if cut_short else "**failed**")
    stopped = " (stopped there by the step cap)" if cut_short else ""
    parts.append(f"return {side['return']:g} in {side['steps']} steps{stopped}")
    if side.get("segments"):
        parts += [plural(side["segments"], "segment"), plural(side["memory_updates"], "memory update")]
    if side.get("memory_horizon"):
        parts.append(f"memory horizon {plural(side['memory_horizon'], 'segment')}")
    return ", ".join(parts)


def aux_class_names(task) -> tuple[str, ...]:
    """Names of the auxiliary head's classes: the evaluation's group names where it groups episodes by
    the same info key (the pillar's colour, the cue), else the values themselves."""
    names = dict(task.evaluation.group_names) if task.evaluation.balance_key == task.aux_label else {}
    return tuple(str(names.get(value, value)) for value in task.aux_values)


def aux_truth(task, trace) -> np.ndarray | None:
    """(T,) the class of the task's auxiliary label at each step of `trace` (what the model saw before
    acting: the reset's info, then each step's), -1 where the value is none of the classes; None
    where the trace does not record it."""
    key = task.aux_label
    if trace is None or key is None or key not in trace.info or key not in trace.reset_info:
        return None
    values = [trace.reset_info[key], *trace.info[key][:-1]]
    return np.array([task.aux_values.index(v) if v in task.aux_values else -1 for v in values])


def memory_panel(panel_input, request: gr.Request = None):
    """Outcome text, the figures and their captions for the traces of a run (outcome_line, then
    panel_figures, which the page asks for apart, so that the line comes with the videos)."""
    return [outcome_line(panel_input, request), *panel_figures(panel_input, request)]


def _stale(panel_input, request) -> bool:
    """No panel input (a run that was superseded), or one of a run that the page no longer shows: Run
    pressed again or another task chosen since the run ended, before its panels were drawn."""
    if not panel_input:
        return True
    page = _page(request)
    return page is not None and "press" in panel_input and page.superseded(panel_input["press"],
                                                                            panel_input["task"])


def outcome_line(panel_input, request: gr.Request = None):
    """The outcome line of a run (which run, and each agent's verdict); for a refused run, its message;
    no update for a stale one (_stale: the page keeps what its latest run shows)."""
    if _stale(panel_input, request):
        return gr.skip()
    if "refused" in panel_input:
        return f"**Not played**: {panel_input['refused']}"
    traces, names = panel_input["traces"], panel_input["names"]
    task = get_task(panel_input["task"])
    summary = panel_input["summary"]
    told = f"  \nThe episode's {task.explain(traces[0].reset_info)}." if task.explain else ""
    return (f"{panel_input['title']}.  \n**{names[0]}**: {_verdict(summary['left'])}.  \n"
            f"**{names[1]}**: {_verdict(summary['right'])}.{told}")


def panel_figures(panel_input, request: gr.Request = None):
    """The figures and their captions for the traces of a run; no update for a refused run (run_started
    has emptied the panels) or a stale one (_stale)."""
    if _stale(panel_input, request) or "refused" in panel_input:
        return [gr.skip()] * (2 * PANELS)
    traces, names = panel_input["traces"], panel_input["names"]
    task = get_task(panel_input["task"])
    memory_index = next((i for i, t in enumerate(traces) if t.memory is not None), None)
    trace = traces[memory_index] if memory_index is not None else None
    name = names[memory_index] if memory_index is not None else names[0]
    replay = panel_input.get("what_if")
    figures = [plots.what_if(replay, names, task.action_names, task.counterfactual_label) if replay else (None, ""),
               plots.memory_heatmaps(trace, name), plots.memory_change(trace, name),
               plots.memory_attention(trace, name, aux_class_names(task), task.explain(trace.reset_info)
                                      if task.explain and trace is not None else "", aux_truth(task, trace)),
               plots.action_probabilities(traces, names, task.action_names)]
    # the counterfactual panel only where the task has a replay (T-Maze), not an empty box
    shown = [gr.update(value=figure, visible=figure is not None) for figure, _ in figures]
    return [*shown, *[caption for _, caption in figures]]


def run_started(task: str, left: str, right: str, seed: float, setting: float, target_return: float,
                step_cap: float, sample: bool, memory_horizon: float = 0, request: gr.Request = None):
    """What the page shows as soon as Run is pressed: which run plays, and nothing of the last run (its
    videos, summary and panels), so that they never stand beside another run's, in each empty number box
    the task's default, which the run plays (the seed, setting, target return, step cap and memory
    horizon, in that order), and the press's number, which the run carries. The run the page was playing
    stops (PageRuns)."""
    page = _page(request, task)
    number = page.press(task) if page else None
    try:
        title = run_title(make_request(task, seed, setting, target_return, step_cap, sample, memory_horizon))
        text = f"{PLAYING}{title}."
    except AppError:
        text = ""  # the run itself says what is wrong
    filled = [gr.skip()] * 5
    if task in demo_tasks():
        defaults = default_inputs(task)
        boxes = zip((seed, setting, target_return, step_cap, memory_horizon), (3, 4, 5, 6, 8), strict=True)
        filled = [gr.update(value=defaults[i]) if value is None and defaults[i] is not None else gr.skip()
                  for value, i in boxes]
    return [text, *cleared_run(), *filled, number]


def cleared_run() -> list:
    """Updates that empty the page of a run: its videos, summary and panel state, then the figures
    (hidden) and their captions."""
    return [None, None, None, None, *[gr.update(value=None, visible=False)] * PANELS, *[""] * PANELS]


def run_failed() -> str:
    """The outcome line after a run that failed (a fault, not bad input: that is refused with its own
    message; Gradio shows the error too, and the server's log has the traceback)."""
    return "**Not played**: the run stopped with an error."


def task_changed(task_name: str, outcome: str = "", request: gr.Request = None):
    """What the page shows for the chosen task, however it was chosen (the dropdown or an example):
    its description, its checkpoint choices and the setting box's label (with its range: the app
    checks it, with its own message, in make_request). The values in the boxes are the example's or,
    when a visitor picks the task, task_defaults'. A run of another task that the page is playing stops
    (PageRuns), and the outcome line says so; what the page showed of a run of the other task (its
    outcome, videos and panels) goes."""
    task = get_task(task_name)
    page = _page(request, task_name)
    if page:
        page.task = task_name
    choices = shipped_choices(task_name)
    spec = task.demo_setting
    setting = gr.update(visible=False) if spec is None else gr.update(
        visible=True, label=f"{spec.label} ({spec.minimum} to {spec.maximum})", info=spec.info)
    stopped = (f"**Stopped**, as another task was chosen: {outcome[len(PLAYING):]}"
               if (outcome or "").startswith(PLAYING) else "")
    return [task_description(task_name), gr.update(choices=choices), gr.update(choices=choices), setting, stopped,
            *cleared_run()]


def task_defaults(task_name: str):
    """The task's default run in the input boxes (left, right, setting, target return, step cap,
    sampling), when a visitor picks the task in the dropdown; an example brings its own values."""
    inputs = default_inputs(task_name)  # task, left, right, seed, setting, target, cap, sample, horizon
    return [*inputs[1:3], *inputs[4:8]]


def default_inputs(task_name: str) -> list:
    task = get_task(task_name)
    left, right = default_pair(task_name)
    setting = task.demo_setting.default if task.demo_setting else None
    return [task_name, left, right, 0, setting, task.evaluation.target_return, task.demo_step_cap or 0,
            task.evaluation.sample_actions, 0]


def warm_cache(examples: list[list], pause_seconds: float = 0.5) -> None:
    """Play the examples in the background so that their results are ready when asked for. On a small
    machine the visitors come first: an example starts only while no visitor's run is playing, and
    one being played stops as soon as a visitor's run starts (unless that run waits for this very
    example), to be played again once the visitors' runs are done."""
    pending = list(examples)
    while pending:
        while _visits:
            time.sleep(pause_seconds)
        try:
            _cached_run(*pending[0], progress=_warm_up_progress)
        except WarmUpYields:
            continue
        except AppClosing:
            return
        except Exception as error:  # a broken shipped checkpoint must not stop the app
            if CLOSING.wait(ERROR_GRACE_SECONDS):  # not news if Ctrl-C (it reaches ViZDoom too) stops the app
                return
            print(f"could not precompute example {pending[0]}: {error}")
        pending.pop(0)


# ----------------------------------------------------------------------------------- page
# Both players from the start, together, once both have loaded a run's videos: a player whose new file
# is the same as its last one (gradio serves files by their content) would otherwise go on where it was.
RESTART_VIDEOS = """(left, right) => {
    if (!left || !right) return;
    const asked = Date.now();
    const players = () => ["left_video", "right_video"].map(id => document.querySelector(`#${id} video`));
    const restart = () => {
        const both = players();
        if (both.every(player => player && player.readyState >= 2)) {
            both.forEach(player => { player.currentTime = 0; player.play(); });
        } else if (Date.now() - asked < 30000) {
            setTimeout(restart, 100);
        }
    };
    restart();
    // the two videos have the same frames: each loops on its own, and a stall of one (a busy tab) would
    // leave them apart; every second, the right one is put back on the left one's time if they drifted
    clearInterval(window.rateVideoSync);
    window.rateVideoSync = setInterval(() => {
        const [one, other] = players();
        if (!one || !other || one.paused || other.paused || one.readyState < 2 || other.readyState < 2) return;
        const near_loop = one.currentTime < 0.5 || one.currentTime > one.duration - 0.5;
        if (!near_loop && Math.abs(one.currentTime - other.currentTime) > 0.15) other.currentTime = one.currentTime;
    }, 1000);
}"""

# Where the window is narrow: the score tables scroll instead of wrapping a letter per line, and the checkbox
# takes a line of its own as the number boxes do (gradio leaves a checkbox no minimum width)
APP_CSS = """#task_text table { display: block; overflow-x: auto; width: max-content; max-width: 100%; }
#task_text th, #task_text td { white-space: nowrap; }
#sample_box { min-width: min(160px, 100%) !important; }"""


def forget_page(request: gr.Request):
    """A page was closed: its runs need no more keeping."""
    with _cache_lock:
        _pages.pop(getattr(request, "session_hash", None), None)


def demo_examples(tasks: list[str]) -> tuple[list[list], list[list]]:
    """The page's examples (per task: its default run, then another seed and setting where the task
    has one) and the order the warm-up plays them in: every task's default run first, since a visitor
    who picks a task and presses Run asks for that one, then the others."""
    examples, defaults, others = [], [], []
    for name in tasks:
        first = default_inputs(name)
        setting = get_task(name).demo_setting
        more = [[*first[:3], 1, setting.example or setting.maximum // 2, *first[5:]]] if setting else []
        examples += [first, *more]
        defaults.append(first)
        others += more
    return examples, defaults + others


def example_label(example: list) -> str:
    """What an example plays, in words: one table's column headers could not name every task's
    setting (T-Maze's corridor length, Minigrid's grid size)."""
    name, _, _, seed, setting, _, cap = example[:7]  # the examples play the task's shipped pair
    task = get_task(name)
    words = [f"seed {seed}"]
    if task.demo_setting is not None:
        words.append(f"{_setting_name(task.demo_setting)} = {setting}")
    if cap:
        words.append(f"first {cap} steps")
    return f"{task.title}: {', '.join(words)}"


def build_demo(warm: bool = True) -> gr.Blocks:
    tasks = demo_tasks()
    examples, warm_order = demo_examples(tasks)
    # delete_cache: Gradio's copies of the videos, an hour old, every half hour (prune_videos keeps our own in check)
    with gr.Blocks(title="RATE: memory transformers for offline RL", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        if not tasks:
            gr.Markdown("No trained checkpoints are shipped yet (they land under `assets/checkpoints/`).")
        first = default_inputs(tasks[0]) if tasks else [None] * 9
        spec = get_task(tasks[0]).demo_setting if tasks else None
        agent_info = ("shipped, a checkpoint folder path, or hf://USER/NAME" if local_paths_allowed()
                      else "shipped, or hf://USER/NAME")
        with gr.Row():
            task = gr.Dropdown([(get_task(name).title, name) for name in tasks], value=first[0], label="task")
            left = gr.Dropdown(shipped_choices(first[0]) if tasks else [], value=first[1], allow_custom_value=True,
                               label="left agent", info=agent_info)
            right = gr.Dropdown(shipped_choices(first[0]) if tasks else [], value=first[2], allow_custom_value=True,
                                label="right agent", info=agent_info)
        task_text = gr.Markdown(task_description(first[0]) if tasks else "", elem_id="task_text")
        with gr.Row():  # no precision=0 on the whole-number boxes: gradio would round 1.5 to 2 unsaid; the app
            # checks them and says what is allowed
            seed = gr.Number(value=0, label="seed", info="the same episode for both agents")
            setting = gr.Number(value=first[4], visible=spec is not None,
                                label=f"{spec.label} ({spec.minimum} to {spec.maximum})" if spec else "setting",
                                info=spec.info if spec else None)
            target = gr.Number(value=first[5], label="target return", info="return-to-go given at the first step")
            cap = gr.Number(value=first[6], label="step cap", info="0: play each episode to its end")
            sample = gr.Checkbox(value=first[7], label="sample actions", info="off: always the most likely action",
                                 elem_id="sample_box")
            horizon = gr.Number(value=0, label="memory horizon (segments)",
                                info="0: remember the whole episode; H: RATE, RMT and TrXL remember the last H "
                                     "segments only (DT keeps its window)")
        run = gr.Button("Run", variant="primary")
        outcome_text = gr.Markdown(elem_id="outcome")
        with gr.Row():  # side by side, one above the other where the screen has no room for two 320-pixel videos
            videos = []
            for side in ("left", "right"):
                with gr.Column(min_width=320):
                    # the agent's name above its video, not a badge over the frame's top-left (T-Maze's cue text)
                    gr.Markdown(f"**{side} agent**")
                    videos.append(gr.Video(show_label=False, autoplay=True, loop=True, interactive=False,
                                           elem_id=f"{side}_video"))
            left_video, right_video = videos
        gr.Markdown("## Inside the memory")
        figures, captions = [], []
        for _ in range(PANELS):
            figures.append(gr.Plot(show_label=False, visible=False))
            captions.append(gr.Markdown())
        summary = gr.JSON(label="summary")
        panel_state = gr.State()
        inputs = [task, left, right, seed, setting, target, cap, sample, horizon]
        gr.Examples(examples, inputs=inputs, example_labels=[example_label(example) for example in examples],
                    label="examples: the shipped RATE vs DT (precomputed: press Run after choosing one)")
        with gr.Accordion("Shipped checkpoints and model configurations", open=False):
            rows = shipped_checkpoints()
            if rows:
                gr.Dataframe(value=rows, headers=["task", "mode", "folder", "status"], interactive=False)
            with gr.Row():
                paper_task = gr.Dropdown(list(PAPER_TASKS), value=PAPER_TASKS[0], label="task (paper configuration)")
                paper_mode = gr.Radio(["rate", "rmt", "trxl", "dt"], value="rate", label="mode")
            paper_text = gr.Markdown()
            config_view = gr.JSON(label="model config")

        panel_outputs = [*figures, *captions]
        run_outputs = [left_video, right_video, summary, panel_state]

        def shown(run_event):
            """The panels, and both videos restarted together, once a run's videos are there."""
            run_event.success(outcome_line, panel_state, outcome_text, api_name=False, trigger_mode="multiple")
            run_event.success(panel_figures, panel_state, panel_outputs, api_name=False, trigger_mode="multiple")
            run_event.success(None, [left_video, right_video], None, js=RESTART_VIDEOS, trigger_mode="multiple")

        # Run first empties the page of the last run (see run_started); a second press while a run plays is not
        # dropped ("multiple"): the newer run supersedes the older one, which stops unshown (PageRuns)
        # the number of the press that a run answers (PageRuns): held by the page, so that a run queued behind
        # other visitors' runs carries its own press (a gr.State is read when the run starts, not when it is queued)
        press = gr.Number(visible=False, precision=0)
        started = run.click(run_started, inputs, [outcome_text, *run_outputs, *figures, *captions, seed, setting,
                                                  target, cap, horizon, press], api_name=False, queue=False)
        run_event = started.then(run_episodes, [*inputs, press], run_outputs, api_name=False, concurrency_limit=2,
                                 concurrency_id="runs", trigger_mode="multiple")
        with gr.Column(visible=False):  # the API's endpoint: its inputs default to None, i.e. the task's defaults
            api_inputs = [gr.Textbox(value=tasks[0] if tasks else None), gr.Textbox(value=None), gr.Textbox(value=None),
                          gr.Number(value=0), *[gr.Number(value=None) for _ in range(3)],
                          gr.JSON(value=None), gr.Number(value=0)]  # a Checkbox has no None
            api_outputs = [gr.Video(label="left video"), gr.Video(label="right video"), gr.JSON(label="summary")]
            gr.Button().click(run_api, api_inputs, api_outputs, api_name="run_episodes", concurrency_limit=2,
                              concurrency_id="runs")
        shown(run_event)
        run_event.failure(run_failed, None, outcome_text, api_name=False)
        task.change(task_changed, [task, outcome_text],
                    [task_text, left, right, setting, outcome_text, *run_outputs, *figures, *captions], api_name=False)
        task.input(task_defaults, task, [left, right, setting, target, cap, sample], api_name=False)
        if tasks:
            def first_run(request: gr.Request):
                """The page's first run, the first task's default (from the cache once the warm-up played it)."""
                number = _page(request, first[0]).press(first[0])
                return run_episodes(*first, number, request=request, progress=lambda *a, **k: None)

            first_title = f"{PLAYING}{run_title(make_request(*first[:1], *first[3:]))}."  # as run_started says
            playing = demo.load(lambda: first_title, None, outcome_text, api_name=False, queue=False)
            shown(playing.then(first_run, None, run_outputs, api_name=False))
        demo.unload(forget_page)
        for trigger in (demo.load, paper_task.change, paper_mode.change):
            trigger(describe, [paper_task, paper_mode], [paper_text, config_view], api_name=False)
    if warm and warm_order:
        threading.Thread(target=warm_cache, args=(warm_order,), daemon=True).start()
    return demo
