"""Many single gymnasium envs stepped together in worker processes, for envs whose simulation is
slow enough (Memory Maze: about 10 ms a step) that stepping them on several cores pays for the
transfer of observations between processes.

The semantics are those of rate_core.envs.lockstep.LockstepVectorEnv, which each worker runs over
its share of the envs: no autoreset; an env that has finished keeps returning its last
observation, reward 0 and terminated/truncated False until the next reset; info values that are
numbers or booleans become arrays of shape (num_envs,); render() gives one frame per env.
Workers are started with the "spawn" method (or "forkserver"), so the env-making callables must be
picklable: module-level functions or functools.partial of them, not lambdas.
"""

import gc
import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rate_core.envs.lockstep import LockstepVectorEnv, check_actions, check_reset_options, env_seeds


STOP_STARTS = threading.Event()
"""Set by an application that is shutting down (the app, once its server has stopped): a
SubprocLockstepVectorEnv whose workers are still making their envs stops them and raises EnvsStopped,
instead of the shutdown waiting seconds for envs nobody will step (Memory Maze: 1-2 s)."""


class EnvsStopped(RuntimeError):
    """The vector env's workers were stopped while making their envs (STOP_STARTS)."""


@contextmanager
def children_ignore_ctrl_c():
    """Processes started inside this block start with SIGINT ignored (Python keeps an inherited
    SIG_IGN), so that a Ctrl-C, which a terminal sends to its whole process group, is the parent's
    alone to handle, even while a child is still importing: a KeyboardInterrupt there prints a
    traceback, and one inside a worker can leave a pool's queue locked. Meanwhile this process
    ignores SIGINT too (process starts take milliseconds). Only the main thread can change signal
    handlers: elsewhere (e.g. the app's threads) the block does nothing, and workers ignore SIGINT
    from their first line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _send_error(connection, error: BaseException) -> None:
    """Send an exception and its traceback (as text when the exception cannot be pickled)."""
    text = "".join(traceback.format_exception(error))
    try:
        connection.send(("error", (error, text)))
    except Exception:
        connection.send(("error", (RuntimeError(text), text)))


def _exit_on_sigterm(signum, frame):
    # What the SIGTERM leaves half-made may complain when collected (dm_control's MjrContext, stopped
    # inside MuJoCo's rendering setup, prints an AttributeError): the parent has said why it stops.
    sys.unraisablehook = lambda unraisable: None
    raise SystemExit(128 + signum)  # through the worker's finally, which closes its envs


def _worker(connection, env_fns: list[Callable[[], gym.Env]]) -> None:
    """Serve (command, argument) requests for a LockstepVectorEnv over `env_fns` until "close" or
    until the parent goes; answers ("ok", result) or ("error", (exception, traceback text)). Ctrl-C
    is the parent's to handle (it closes the workers; SIGINT reaches a terminal's whole process group,
    and a KeyboardInterrupt inside MuJoCo's context making leaves a half-made object that complains
    when collected). A parent that has gone (killed, or stopped by SIGTERM while the envs were being
    made or stepped) ends the worker quietly once its work in hand is done: there is no one to
    answer, and no traceback. SIGTERM (close with terminate) closes the envs on the way out, also
    those made when it stops the making of the others (LockstepVectorEnv closes them): a ViZDoom game
    left open would keep its engine process running."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    envs = None
    try:
        try:
            envs = LockstepVectorEnv(env_fns)
        except Exception as error:
            _send_error(connection, error)
            return
        connection.send(("ok", (envs.single_observation_space, envs.single_action_space, envs.render_mode,
                                envs.metadata)))
        while True:
            command, argument = connection.recv()
            if command == "close":
                break
            try:
                if command == "reset":
                    result = envs.reset(seed=argument[0], options=argument[1])
                elif command == "step":
                    result = envs.step(argument)
                elif command == "render":
                    result = envs.render()
                else:
                    raise ValueError(f"unknown command {command!r}")
            except Exception as error:  # the env's own error: report it (the envs stepped before it stay stepped)
                _send_error(connection, error)
                continue
            connection.send(("ok", result))
    except (EOFError, ConnectionError):
        pass  # the parent has gone: its end of the pipe closed before a request came or an answer went
    finally:
        if envs is not None:
            envs.close()
        connection.close()


def _worker_process(connection, env_fns: list[Callable[[], gym.Env]]) -> None:
    """A worker process's whole life: _worker, then the heap frozen, so that the interpreter's last
    garbage collection, over everything MuJoCo or ViZDoom made, is skipped (the process ends next;
    its envs are closed). close() of 8 Memory Maze envs in 2 workers took 0.67 s before, 0.24 s so;
    evaluate stopped by Ctrl-C while they were being made, 1.6-2.1 s before, 0.4-1.0 s so."""
    try:
        _worker(connection, env_fns)
    finally:  # a SIGTERM's SystemExit too
        gc.freeze()


class SubprocLockstepVectorEnv(VectorEnv):
    """`len(env_fns)` envs made by the given (picklable) callables in `num_workers` processes
    (default: one per CPU core, at most one per env), each holding a contiguous share of the envs.
    Same semantics as LockstepVectorEnv (see the module docstring); close() ends the workers."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]], num_workers: int | None = None,
                 start_method: str = "spawn"):
        self._connections, self._processes = [], []  # before any check: __del__ looks at them
        if not env_fns:
            raise ValueError("need at least one env")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be at least 1 (None: one per CPU core), got {num_workers}")
        self.num_envs = len(env_fns)
        num_workers = min(num_workers or os.cpu_count() or 1, self.num_envs)
        self._shares = [len(share) for share in np.array_split(np.arange(self.num_envs), num_workers)]
        context = mp.get_context(start_method)
        first = 0
        for size in self._shares:
            parent, child = context.Pipe()
            process = context.Process(target=_worker_process, args=(child, env_fns[first:first + size]), daemon=True)
            with children_ignore_ctrl_c():
                process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)
            first += size
        self.closed = False
        try:
            described = self._receive_all(starting=True)
        except BaseException:
            self.close(terminate=True)  # e.g. Ctrl-C: the other workers' envs, still being made, are not needed
            raise
        self.single_observation_space, self.single_action_space, self.render_mode, metadata = described[0]
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.metadata = {**metadata, "autoreset_mode": AutoresetMode.DISABLED}
        self.done = np.ones(self.num_envs, dtype=bool)

    def _receive_all(self, starting: bool = False) -> list:
        """Every worker's answer to the last request, in worker order. A worker's exception is
        raised again here (the first one, with the worker's traceback as a note); starting: the
        workers' first answer, after making their envs (EnvsStopped once STOP_STARTS is set)."""
        answers, failure = [], None
        for worker, connection in enumerate(self._connections):
            while starting and not connection.poll(0.05):
                if STOP_STARTS.is_set():  # the constructor then ends the workers (close with terminate)
                    raise EnvsStopped("the env workers were stopped while they made their envs (shutting down)")
            try:
                status, result = connection.recv()
            except (EOFError, ConnectionError):
                status, result = "error", (RuntimeError(self._ended(worker, starting)), "")
            if status == "error":
                error, text = result
                if failure is None:
                    if text:  # a worker that ended says so in the message itself
                        error.add_note(f"raised in env worker {worker}:\n{text}".rstrip())
                    failure = error
            answers.append(result)
        if failure is not None:
            raise failure
        return answers

    def _ended(self, worker: int, starting: bool = False) -> str:
        """Why a worker's connection closed, for the error: its exit code (waited for briefly, as the
        pipe closes before the process is gone) and what a kill by SIGKILL or a failed start usually means."""
        process = self._processes[worker]
        process.join(timeout=5)
        message = f"env worker {worker} ended (exit code {process.exitcode})"
        if starting and process.exitcode == 1:
            message += (" before it made its envs; its error is printed above. From a script, the most common "
                        "cause: a worker process imports the script again (they are started by spawn), so the "
                        "code that makes the envs must be under `if __name__ == \"__main__\":`")
        elif process.exitcode == -signal.SIGKILL:
            message += ("; it was killed (SIGKILL), most often by the kernel's out-of-memory killer: run fewer envs "
                        "at once, or fewer jobs beside this one")
        return message

    def _request(self, command: str, arguments: list) -> list:
        if self.closed:
            raise RuntimeError("this vector env is closed; make a new one")
        for worker, (connection, argument) in enumerate(zip(self._connections, arguments, strict=True)):
            try:
                connection.send((command, argument))
            except (BrokenPipeError, ConnectionError):  # it died since the last request
                raise RuntimeError(self._ended(worker)) from None
        return self._receive_all()

    def _split(self, values) -> list:
        return np.split(np.asarray(values), np.cumsum(self._shares)[:-1])

    def _merge_infos(self, infos: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        keys = sorted({key for info in infos for key in info})
        merged = {}
        for key in keys:
            like = next(info[key] for info in infos if key in info)
            merged[key] = np.concatenate([info.get(key, np.zeros(size, dtype=like.dtype))
                                          for info, size in zip(infos, self._shares, strict=True)])
        return merged

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """seed: an int (env i gets seed + i), one seed per env, or None."""
        check_reset_options(options)
        seeds = env_seeds(seed, self.num_envs)
        bounds = np.cumsum([0, *self._shares])
        answers = self._request("reset", [(seeds[lo:hi], options) for lo, hi in pairwise(bounds)])
        self.done[:] = False
        return np.concatenate([obs for obs, _ in answers]), self._merge_infos([info for _, info in answers])

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        actions = np.asarray(actions)
        if actions.shape[:1] != (self.num_envs,):
            raise ValueError(f"expected {self.num_envs} actions, got an array of shape {actions.shape}")
        check_actions(self.single_action_space, actions, ~self.done)  # before any worker steps its envs
        answers = self._request("step", self._split(actions))
        obs, reward, terminated, truncated = (np.concatenate(parts) for parts in list(zip(*answers, strict=True))[:4])
        self.done |= terminated | truncated
        return obs, reward, terminated, truncated, self._merge_infos([answer[4] for answer in answers])

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode != "rgb_array":
            return None
        return tuple(frame for frames in self._request("render", [None] * len(self._connections)) for frame in frames)

    def workers_alive(self) -> bool:
        """Whether every worker process is still running (one killed, e.g. for memory, is not)."""
        return not self.closed and all(process.is_alive() for process in self._processes)

    def close_extras(self, terminate: bool = False, **kwargs) -> None:
        """End the workers: each closes its envs and exits (at most 30 s each) or, with terminate, at once."""
        for connection in self._connections:
            try:
                connection.send(("close", None))
            except (BrokenPipeError, ConnectionError, OSError):
                pass  # the worker has already gone
        for process in self._processes:
            if terminate:
                process.terminate()
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join()
            process.close()  # its pipes' file descriptors, now rather than when this object is collected
        for connection in self._connections:
            connection.close()

    def __del__(self):
        if getattr(self, "_processes", None) and not self.closed:  # not for one whose constructor failed early
            self.close()
