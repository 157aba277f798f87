"""What the tools' command lines share (tyro): `cli` parses a dataclass of arguments, markers for
help texts that state a field's default in words, and the checks of values every tool makes the same
way (a task by name, a device, a count, a field's bounds given as AtLeast / AtMost metadata): each ends
the program with one line that says what to do."""

import ast
import dataclasses
import gc
import inspect
import multiprocessing
import os
import signal
import sys
import tempfile
import textwrap
import threading
import typing
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Annotated, TypeVar

import tyro

from rate_core.envs.subproc import children_ignore_ctrl_c

T = TypeVar("T")

OWN_DEFAULT = tyro.conf.arg(help_behavior_hint="")
"""for a field whose help says its default in words ('default: the protocol's'): tyro adds no second one"""

TASK_DEFAULT = tyro.conf.arg(help_behavior_hint="(default: the task's)")
"""for a field left None to take the task's value (its TrainDefaults in rate_core.tasks)"""

NONE_DEFAULT = tyro.conf.arg(help_behavior_hint="(default: none)")
"""for a list of settings that is empty unless given"""


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """A field's lowest value, as metadata: `count: Annotated[int, AtLeast(1)] = 4`. `cli` refuses a smaller
    value (None, where a field allows it, is left alone) with one line before the tool does any work."""

    lowest: float


@dataclasses.dataclass(frozen=True)
class AtMost:
    """A field's highest value, as metadata (beside AtLeast): `share: Annotated[float, AtLeast(0), AtMost(1)]`."""

    highest: float


def check_bounds(config, hints: dict) -> None:
    """SystemExit naming the option if a field of `config` lies outside its AtLeast / AtMost bounds."""
    for name, hint in hints.items():
        value = getattr(config, name, None)
        if value is None or typing.get_origin(hint) is not Annotated:
            continue
        for bound in hint.__metadata__:
            flag = f"--{name.replace('_', '-')}"
            if isinstance(bound, AtLeast):
                at_least(flag, value, bound.lowest)
            if isinstance(bound, AtMost) and not value <= bound.highest:
                raise SystemExit(f"error: {flag} must be at most {bound.highest}, got {value}")


def field_docs(config_class: type) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body) as one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(config_class)))
    body = tree.body[0].body
    docs = {}
    for node, after in pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def cli(config_class: type[T], args: list[str] | None = None) -> T:
    """tyro.cli(config_class), each field's help one paragraph. (tyro keeps the line break before every
    indented continuation line of a field docstring, so help texts broke mid-sentence at each source
    line on a narrow terminal.)"""
    docs = field_docs(config_class)
    hints = typing.get_type_hints(config_class, include_extras=True)
    fields = []
    for f in dataclasses.fields(config_class):
        if f.name in docs:
            fields.append((f.name, Annotated[hints[f.name], tyro.conf.arg(help=docs[f.name])],
                           dataclasses.field(default=f.default, default_factory=f.default_factory)))
    helped = dataclasses.make_dataclass(config_class.__name__, fields, bases=(config_class,))
    helped.__doc__ = config_class.__doc__
    helped.__module__ = config_class.__module__
    parsed = tyro.cli(helped, args=args, prog=program_name())
    check_bounds(parsed, hints)
    # an instance of config_class itself (the subclass made here could not be pickled, e.g. to workers)
    return config_class(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(config_class) if f.init})


def program_name() -> str | None:
    """How the running tool is started, for its usage line: `python -m training.evaluate`, not the path
    of the file (which cannot be run as a script); None when not started with -m."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name != "__main__" else None


def task_or_exit(name: str):
    """The registry's task `name` (rate_core.tasks.get_task); SystemExit listing the tasks if unknown."""
    from rate_core.tasks import get_task

    try:
        return get_task(name)
    except KeyError as error:
        raise SystemExit(f"error: {error.args[0]}") from None


def device_or_exit(choice: str) -> str:
    """cpu, cuda (or cuda:N) for `choice` (auto: cuda when there is one); SystemExit if that device is
    unknown or not on this machine."""
    from rate_core.checkpoint import resolve_device

    try:
        device = resolve_device(choice)
    except ValueError as error:
        raise SystemExit(f"error: --{error}") from None
    if device.type not in ("cpu", "cuda"):  # the tools are made and measured for these two
        raise SystemExit(f"error: --device must be cpu, cuda, cuda:N or auto, got {choice!r}")
    return str(device)


def at_least(flag: str, value, lowest) -> None:
    """SystemExit unless `value` (the value of option `flag`) is at least `lowest` (nan is not)."""
    if not value >= lowest:
        raise SystemExit(f"error: {flag} must be at least {lowest}, got {value}")


def writable_file_or_exit(flag: str, path) -> None:
    """SystemExit unless a file can be written at `path` (not a folder; its folder exists and is writable),
    checked before the work whose results it will hold."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: {flag} {path}: cannot write a file there (a folder); give a file's path")
    if not path.parent.is_dir() or not _can_make_file_in(path.parent):
        raise SystemExit(f"error: {flag} {path}: cannot write a file there (its folder {path.parent} is missing "
                         f"or read-only)")


def folder_out_or_exit(flag: str, path) -> None:
    """SystemExit unless a folder can be put at `path` (its parent is made if missing and must take new
    entries), checked before the work: a tool builds its output beside `path` and swaps it in at the end."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: {flag} {path}: cannot make its folder {parent} ({error.strerror})") from None
    if not _can_make_file_in(parent):
        raise SystemExit(f"error: {flag} {path}: cannot write in its folder {parent} (read-only)")


def _can_make_file_in(folder: Path) -> bool:
    """Whether a file can be made in `folder`, by making one (and deleting it): os.access passes for
    root on a read-only mount or in /proc, where the write would fail only after the work."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check."):
            return True
    except OSError:
        return False


def check_env_settings(task, settings_list: list[dict], flags: str) -> None:
    """Build one env of `task` with each of `settings_list` and close it, so that settings an env refuses
    end the program with the env's own message before any work starts (flags: the options that gave them)."""
    for settings in settings_list:
        try:
            task.make_env(**settings).close()
        except (ValueError, TypeError) as error:
            raise SystemExit(f"error: {flags}: {error}") from None


def worker_pool(workers: int, on_stop=None, start_method: str = "spawn") -> ProcessPoolExecutor:
    """A process pool for a tool's parallel work, whose workers leave Ctrl-C to the tool (a terminal
    sends SIGINT to its whole process group, and a KeyboardInterrupt inside a worker can leave the
    pool's queue locked) and end at once on stop_pool's SIGTERM, after on_stop() (a picklable function
    of no arguments) closes what they hold: a ViZDoom game a killed worker left open keeps its engine
    process running."""
    return _WorkerPool(workers, mp_context=multiprocessing.get_context(start_method), initializer=_start_worker,
                       initargs=(on_stop,))


class _WorkerPool(ProcessPoolExecutor):
    """A submit (map submits too) may start a worker: it starts with SIGINT ignored already, while
    it imports, before the initializer runs (children_ignore_ctrl_c)."""

    def submit(self, fn, /, *args, **kwargs):
        with children_ignore_ctrl_c():
            return super().submit(fn, *args, **kwargs)


def _start_worker(on_stop) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def stop(signum, frame):
        try:
            if on_stop is not None:
                on_stop()
        finally:
            try:
                _close_engines()
            finally:
                os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _close_engines() -> None:
    """Close the ViZDoom games of this process that on_stop did not (an env still being made when the
    SIGTERM came, which no tool holds yet), where ViZDoom was used here at all."""
    vizdoom = sys.modules.get("rate_core.envs.vizdoom_two_colors")
    if vizdoom is not None:
        vizdoom.close_all()


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """End the pool's workers now (SIGTERM: worker_pool's workers close what they hold first), work in
    hand included: call it once the results needed are in, or on the way out after an error or
    Ctrl-C. Waiting for them took up to a job's time (a collector runs ahead), and a Ctrl-C during
    that wait hung the process at exit: the pool's queue had lost its feeder thread, so the workers
    never heard they should stop."""
    workers = list((pool._processes or {}).values())  # no public way to them before Python 3.14's terminate_workers
    results = pool._result_queue  # (shutdown forgets it)
    manager = pool._executor_manager_thread
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        process.terminate()
    for process in workers:
        process.join()
    # A worker ended while it wrote a result (frames: megabytes) left half a message in the results pipe, and
    # the pool's thread waited for the rest for ever, and the interpreter's exit for that thread (frame_probe
    # after Ctrl-C: 1 hang in 4). No worker is left to write, so this process's own write end is the last:
    # closed, the thread reads the end of the pipe and finishes.
    if results is not None:
        results._writer.close()
    # That close did not always free it (1 hang in 5 seen after this fix, the pipe's write end still open
    # somewhere): run_main's Ctrl-C way out ends the process at once where the thread is still waiting
    if manager is not None:
        manager.join(timeout=2)
        if manager.is_alive():
            _STUCK_POOL_THREADS.append(manager)


_STUCK_POOL_THREADS: list = []  # pool threads stop_pool could not end; the interpreter's exit would wait for them


def run_main(main, args, interrupted: str = "interrupted") -> None:
    """main(args), a Ctrl-C ending it with the line `interrupted` instead of a traceback (checkpoints and
    datasets are put in place only when complete, so what was written whole stays). SIGTERM (a job
    scheduler's, `kill`) takes the same way out, so that envs close: killed outright, a tool would
    leave the engine process of each ViZDoom game it had open running."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main(args)
    except KeyboardInterrupt:
        # What the Ctrl-C left half-made may complain when collected on the way out (dm_control's
        # MjrContext, stopped inside MuJoCo's rendering setup, prints an AttributeError): not news here.
        sys.unraisablehook = lambda unraisable: None
        if any(thread.is_alive() for thread in _STUCK_POOL_THREADS):  # the exit would wait for them for ever
            print(interrupted, file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # as SystemExit(interrupted) would
        raise SystemExit(interrupted) from None
    finally:
        # The process ends next: the interpreter's last garbage collection would walk everything torch,
        # MuJoCo and the rest made (0.7 s of Memory Maze evaluate's 0.9 s exit); frozen, it is skipped.
        # What must be closed (files, envs, worker processes) is closed by the tools or when its last
        # reference goes, not by that collection; objects in reference cycles are not finalized.
        gc.freeze()
