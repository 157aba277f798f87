"""Memory Maze 9x9: the gymnasium env over memory-maze, its numpy contact check against
memory-maze's own loop, the planning expert, and the subprocess vector env (also on the cheap
T-Maze, against LockstepVectorEnv).

A reset costs about half a second (memory-maze recompiles the MuJoCo model and its rendering
context for each new maze), so the tests share one env where they can."""

import functools
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rate_core.envs.lockstep import LockstepVectorEnv
from rate_core.envs.memory_maze import (ACTIONS, BEARINGS, FRAME_SIZE, OBS_SHAPE, ExploringMemoryMazeExpert,
                                        MemoryMazeEnv, MemoryMazeExpert, _update_activation_vectorised, bearing,
                                        grid_distances)
from rate_core.envs.subproc import SubprocLockstepVectorEnv, _worker, _worker_process, children_ignore_ctrl_c
from rate_core.envs.tmaze import TMazeEnv
from rate_core.tasks import get_task


@pytest.fixture(scope="module")
def env():
    env = MemoryMazeEnv(step_cap=150, render_mode="rgb_array")
    yield env
    env.close()


def run_expert(env: MemoryMazeEnv, seed: int, steps: int, noise: float = 0.1, replay: MemoryMazeEnv | None = None):
    """Observations (steps + 1, ...), rewards and infos of the expert's episode on `env`; with
    `replay`, the same actions are also taken in that env and its results are returned too."""
    expert = MemoryMazeExpert(noise=noise)
    obs, info = env.reset(seed=seed)
    expert.reset(env, info)
    runs = [(env, [obs], [], [info])]
    if replay is not None:
        replay_obs, replay_info = replay.reset(seed=seed)
        runs.append((replay, [replay_obs], [], [replay_info]))
    for _ in range(steps):
        action = expert.act(env, obs, info)
        for run_env, observations, rewards, infos in runs:
            step_obs, reward, terminated, truncated, step_info = run_env.step(action)
            observations.append(step_obs)
            rewards.append(reward)
            infos.append(step_info)
            assert not terminated
        obs, info = runs[0][1][-1], runs[0][3][-1]
    return [(np.stack(o), np.array(r), i) for _, o, r, i in runs]


# --------------------------------------------------------------------------------- the env
@pytest.mark.filterwarnings("ignore:.*alternative render modes")  # an env made without gymnasium.make
def test_spaces_and_gymnasium_checker(env):
    assert env.observation_space.shape == OBS_SHAPE == (3, 64, 64)
    assert env.observation_space.dtype == np.uint8
    assert env.action_space.n == len(ACTIONS) == 6
    check_env(env)  # a dozen resets, seed determinism, render


def test_observation_border_info_and_render(env):
    obs, info = env.reset(seed=3)
    assert obs.shape == OBS_SHAPE and obs.dtype == np.uint8 and obs.flags.c_contiguous
    assert set(info) == {"target_index", "targets_collected", "agent_x", "agent_y", "target_bearing"}
    assert info["target_bearing"] == bearing(env.agent_pos, env.agent_dir, env.targets_pos[info["target_index"]])
    assert info["targets_collected"] == 0 and 0 <= info["agent_x"] < 9 and 0 <= info["agent_y"] < 9
    # the 2-pixel frame border has the current target's colour (memory-maze draws it at 0.7 x 255;
    # imported here, after the env has chosen the OpenGL backend, which memory-maze would set itself)
    from memory_maze.maze import TARGET_COLORS

    border = obs[:, 0, 0].astype(float)
    distances = [np.abs(border - colour * 255 * 0.7).sum() for colour in TARGET_COLORS[:3]]
    assert np.argmin(distances) == info["target_index"]
    assert (obs[:, :2, :] == obs[:, :1, :1]).all() and (obs[:, :, -2:] == obs[:, :1, :1]).all()
    frame = env.render()
    assert frame.shape == (FRAME_SIZE, 2 * FRAME_SIZE, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame[::4, :FRAME_SIZE:4], obs.transpose(1, 2, 0))  # the observation, 4x
    assert frame[:, FRAME_SIZE:].std() > 10  # the top-down view is a picture, not a blank


def test_render_draws_the_agent_on_a_map_rendered_once_per_episode(env):
    # render() renders the top-down camera once per episode with the agent hidden; each frame must
    # still be what the camera shows now, but for the few pixels of the ball under the drawn disc,
    # also after targets were touched (seed 1: at steps 8 and 45) and in the next episode
    camera = env._task.root_entity.top_camera.full_identifier
    for seed, steps in ((1, 50), (3, 5)):
        expert = MemoryMazeExpert(noise=0.1)
        obs, info = env.reset(seed=seed)
        expert.reset(env, info)
        physics = env.maze_env.physics  # a reset compiles a new one
        for _ in range(steps):
            obs, reward, _, _, info = env.step(expert.act(env, obs, info))
            top = env.render()[:, FRAME_SIZE:]
            camera_view = physics.render(FRAME_SIZE, FRAME_SIZE, camera_id=camera)
            ys, xs = np.nonzero((top != camera_view).any(axis=-1))
            assert xs.max() - xs.min() <= 20 and ys.max() - ys.min() <= 20  # the disc and its heading line
            disc = top[ys.min():ys.max() + 1, xs.min():xs.max() + 1].reshape(-1, 3)
            assert (disc == (255, 150, 30)).all(axis=1).sum() >= 30  # where the agent is, in orange
        assert info["targets_collected"] == (2 if seed == 1 else 0)


def test_step_cap_truncates_and_bad_actions_raise(env):
    env.reset(seed=1)
    with pytest.raises(ValueError, match="invalid Memory Maze action"):
        env.step(6)
    for step in range(1, 151):
        _, _, terminated, truncated, _ = env.step(0)
        assert not terminated and truncated == (step == 150)
    with pytest.raises(RuntimeError, match="over"):
        env.step(0)
    with pytest.raises(ValueError, match="step_cap"):
        MemoryMazeEnv(step_cap=1001)
    closed = MemoryMazeEnv(step_cap=5)
    closed.reset(seed=1)
    closed.close()
    with pytest.raises(RuntimeError, match="this Memory Maze env is closed"):  # mid-episode too
        closed.step(0)


def test_an_egl_probe_that_dies_without_a_word_falls_back_to_osmesa(monkeypatch):
    import rate_core.envs.memory_maze as memory_maze

    monkeypatch.delitem(sys.modules, "dm_control._render", raising=False)  # as before dm_control is imported
    environ = {name: value for name, value in os.environ.items() if name != "MUJOCO_GL"}
    monkeypatch.setattr(os, "environ", environ)  # what the choice writes stays in this copy
    monkeypatch.setattr(memory_maze.subprocess, "run",  # e.g. a driver that crashes the probe (SIGSEGV)
                        lambda *args, **kwargs: subprocess.CompletedProcess(args, -11, "", ""))
    monkeypatch.setattr(memory_maze.ctypes.util, "find_library", lambda name: "libOSMesa.so.8")
    assert memory_maze.choose_gl_backend() == "osmesa" and environ["MUJOCO_GL"] == "osmesa"


def test_reset_does_not_flood_the_log_but_other_absl_warnings_pass(env, caplog):
    from absl import logging as absl_logging

    with caplog.at_level(logging.WARNING, logger="absl"):
        env.reset(seed=3)
        absl_logging.warning("a different warning")
    messages = [record.getMessage() for record in caplog.records]
    assert not any("Cannot set velocity" in m for m in messages)
    assert "a different warning" in messages


def test_making_an_env_prints_no_gym_notice():
    code = "from rate_core.envs.memory_maze import MemoryMazeEnv; MemoryMazeEnv().close()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Gym has been unmaintained" not in done.stderr


def test_seed_fixes_the_episode(env):
    actions = np.random.default_rng(0).integers(6, size=10)

    def play(seed):
        observations = [env.reset(seed=seed)[0]]
        layout = env.maze_layout.copy()
        observations += [env.step(a)[0] for a in actions]
        return layout, np.stack(observations)

    layout, first = play(7)
    other_layout, _ = play(8)
    again_layout, again = play(7)
    np.testing.assert_array_equal(layout, again_layout)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(layout, other_layout)


def test_patched_env_matches_memory_maze_as_published():
    """Same seeds, same actions (the expert's, so that targets are touched): the numpy contact
    check and the shared wall textures give exactly the observations, rewards and infos of
    memory-maze's Python loop and texture copies."""
    fast, slow = MemoryMazeEnv(step_cap=150), MemoryMazeEnv(step_cap=150, patched=False)
    try:
        assert fast._task._targets[0]._update_activation.__func__ is _update_activation_vectorised
        # already before its first reset (a vector env's worker makes all its envs before resetting any)
        assert fast.maze_env.physics.model.ntex < slow.maze_env.physics.model.ntex / 4
        assert slow._task._targets[0]._update_activation.__func__ is not _update_activation_vectorised
        rewards = 0.0
        for seed in (0, 1):
            (fast_obs, fast_rewards, fast_infos), (slow_obs, slow_rewards, slow_infos) = run_expert(
                fast, seed, steps=120, replay=slow)
            np.testing.assert_array_equal(fast_obs, slow_obs)
            np.testing.assert_array_equal(fast_rewards, slow_rewards)
            assert fast_infos == slow_infos
            rewards += fast_rewards.sum()
        assert rewards >= 4  # the check was exercised
        assert fast.maze_env.physics.model.ntex < slow.maze_env.physics.model.ntex / 4  # 16 textures, not 88
    finally:
        fast.close()
        slow.close()


# ------------------------------------------------------------------------------- the expert
def test_grid_distances():
    layout = np.array([[1, 1, 1],
                       [0, 0, 1],
                       [1, 1, 1]], dtype=np.uint8)  # row 0 is y = 0
    distance = grid_distances(layout, (0, 0))
    np.testing.assert_array_equal(distance, [[0, 1, 2], [-1, -1, 3], [6, 5, 4]])


def test_expert_collects_targets(env):
    [(_, rewards, infos)] = run_expert(env, seed=5, steps=150, noise=0.0)
    assert rewards.sum() >= 3  # about one target per 36 steps (28 per 1000-step episode)
    assert infos[-1]["targets_collected"] == rewards.sum()
    assert len({info["target_index"] for info in infos}) >= 2  # the current target changes


# ------------------------------------------------------------------ the subprocess vector env
def assert_same(ours: tuple, reference: tuple) -> None:
    """Equal results of reset() or step(): arrays with equal values and dtypes, info dicts with the same keys."""
    for got, expected in zip(ours, reference, strict=True):
        if isinstance(got, dict):
            assert got.keys() == expected.keys()
            assert_same(tuple(got.values()), tuple(expected.values()))
        else:
            np.testing.assert_array_equal(got, expected)
            assert got.dtype == expected.dtype


def test_subproc_vector_env_matches_lockstep_on_tmaze():
    env_fns = [functools.partial(TMazeEnv, episode_length=n, render_mode="rgb_array") for n in (5, 8, 12, 6, 9)]
    ours, reference = SubprocLockstepVectorEnv(env_fns, num_workers=2), LockstepVectorEnv(env_fns)
    try:
        assert ours.single_observation_space == reference.single_observation_space
        assert ours.action_space == reference.action_space
        rng = np.random.default_rng(0)
        for seed in ([3, 4, 5, 6, 7], 11):
            assert_same(ours.reset(seed=seed), reference.reset(seed=seed))
            for _ in range(14):  # past every episode's end: finished envs are not stepped
                actions = rng.integers(4, size=5)
                assert_same(ours.step(actions), reference.step(actions))
            assert ours.done.all()
        for frame, reference_frame in zip(ours.render(), reference.render(), strict=True):
            np.testing.assert_array_equal(frame, reference_frame)
        for bad in (ours, reference):
            bad.reset(seed=0)  # refused before any env steps: none is left a step ahead of the others
            with pytest.raises(ValueError, match=r"env 0: invalid action 9 for the action space Discrete\(4\)"):
                bad.step([9, 0, 0, 0, 0])
        with pytest.raises(ValueError, match="expected 5 actions"):
            ours.step([0, 0])
        assert ours.step([0] * 5)[0].shape == (5, 4)
        pids = [process.pid for process in ours._processes]
    finally:
        ours.close()
        reference.close()
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class FailsOnItsThirdStep(TMazeEnv):
    def step(self, action):
        if self._t == 2:
            raise ValueError("this env fails on its third step")
        return super().step(action)


def test_an_envs_error_in_a_worker_reaches_the_parent_and_the_workers_go_on():
    fds = len(os.listdir("/proc/self/fd"))
    envs = SubprocLockstepVectorEnv([functools.partial(TMazeEnv, episode_length=8),
                                     functools.partial(FailsOnItsThirdStep, episode_length=8)], num_workers=2)
    try:
        envs.reset(seed=0)
        envs.step([0, 0])
        envs.step([0, 0])
        with pytest.raises(ValueError, match="this env fails on its third step") as error:
            envs.step([0, 0])
        assert "env worker 1" in "".join(error.value.__notes__)  # with the worker's traceback
        assert envs.reset(seed=1)[0].shape == (2, 4)  # the workers go on
    finally:
        envs.close()
    assert len(os.listdir("/proc/self/fd")) == fds  # closed, its processes leave no file descriptor open
    with pytest.raises(ValueError, match="need at least one env"):
        SubprocLockstepVectorEnv([])
    with pytest.raises(ValueError, match="num_workers must be at least 1"):
        SubprocLockstepVectorEnv([TMazeEnv], num_workers=-1)
    with pytest.raises(ValueError, match="reset_mask is not supported"):
        LockstepVectorEnv([TMazeEnv]).reset(options={"reset_mask": np.array([True])})


def test_a_worker_whose_parent_has_gone_closes_its_envs_and_ends_quietly(capfd, monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the worker, run here, would ignore Ctrl-C in pytest
    closed = []

    class Watched(TMazeEnv):
        def close(self):
            closed.append(True)
            super().close()

    # the parent gone while the worker made its envs (e.g. the app stopped by SIGTERM at start-up)
    parent, child = multiprocessing.Pipe()
    parent.close()
    _worker(child, [functools.partial(Watched, episode_length=5)])  # returns: nothing to answer
    assert closed == [True] and child.closed

    # gone while a reset was under way: its answer cannot go
    class ParentGoesDuringReset(Watched):
        def reset(self, **kwargs):
            parent.close()
            return super().reset(**kwargs)

    parent, child = multiprocessing.Pipe()
    parent.send(("reset", ([1], None)))
    _worker(child, [functools.partial(ParentGoesDuringReset, episode_length=5)])
    assert closed == [True, True] and child.closed
    assert "Traceback" not in capfd.readouterr().err


class MarksItsClose(TMazeEnv):
    """A T-Maze env that leaves a file at `mark` when closed (module level: workers are spawned)."""

    def __init__(self, mark: Path, **kwargs):
        super().__init__(**kwargs)
        self.mark = mark

    def close(self):
        self.mark.touch()
        super().close()


class HalfMade:
    """Complains when collected, as dm_control's MjrContext does when its making was stopped."""

    def __del__(self):
        raise AttributeError("HalfMade has no attribute '_ptr'")


class SlowToMake(TMazeEnv):
    """An env whose making is stopped half-way: it holds a HalfMade, leaves a file at `mark` (and its
    process id in a file beside it), then waits."""

    def __init__(self, mark: Path, **kwargs):
        part = HalfMade()  # noqa: F841 (collected when the SIGTERM's SystemExit leaves this frame)
        (mark.parent / f"pid{os.getpid()}").touch()
        mark.touch()
        time.sleep(60)
        super().__init__(**kwargs)


def test_a_worker_stopped_while_it_makes_its_envs_ends_quietly(tmp_path, capfd):
    # the parent's Ctrl-C closes the workers with SIGTERM, which may stop one inside MuJoCo's context making:
    # what it left half-made must not print "Exception ignored in ..." under the one line "interrupted"
    mark = tmp_path / "making"
    parent, child = multiprocessing.Pipe()
    made_first = tmp_path / "made first, closed"
    worker = multiprocessing.get_context("spawn").Process(
        target=_worker_process, args=(child, [functools.partial(MarksItsClose, made_first, episode_length=5),
                                              functools.partial(SlowToMake, mark, episode_length=5)]))
    worker.start()
    deadline = time.monotonic() + 60
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mark.exists()
    worker.terminate()
    worker.join(timeout=30)
    assert worker.exitcode == 128 + signal.SIGTERM
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "HalfMade" not in err, err
    assert made_first.exists()  # the env it had made before is closed (a ViZDoom engine would stop)


class FailsToBeMade(TMazeEnv):
    def __init__(self, **kwargs):
        raise RuntimeError("no engine for this env")


def test_envs_made_before_one_that_fails_to_be_made_are_closed(tmp_path):
    marks = [tmp_path / "0", tmp_path / "1"]
    with pytest.raises(RuntimeError, match="no engine for this env"):
        LockstepVectorEnv([functools.partial(MarksItsClose, marks[0], episode_length=5),
                           functools.partial(MarksItsClose, marks[1], episode_length=5), FailsToBeMade])
    assert all(mark.exists() for mark in marks)
    with pytest.raises(RuntimeError, match="no engine for this env"):  # in a worker: reported, the others closed
        SubprocLockstepVectorEnv([functools.partial(MarksItsClose, tmp_path / "2", episode_length=5),
                                  FailsToBeMade], num_workers=1)
    assert (tmp_path / "2").exists()


def test_env_workers_still_starting_stop_when_the_app_shuts_down(tmp_path):
    # the app sets STOP_STARTS once its server stops: a run's workers still making their envs are ended, and
    # the constructor raises at once instead of the shutdown waiting for envs nobody will step
    import threading

    from rate_core.envs import subproc

    mark = tmp_path / "making"

    def shut_down_once_making():
        deadline = time.monotonic() + 60
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        subproc.STOP_STARTS.set()

    app = threading.Thread(target=shut_down_once_making)
    app.start()
    started = time.monotonic()
    try:
        with pytest.raises(subproc.EnvsStopped, match="stopped while they made their envs"):
            SubprocLockstepVectorEnv([functools.partial(SlowToMake, mark, episode_length=5)] * 2, num_workers=2)
    finally:
        subproc.STOP_STARTS.clear()
        app.join()
    assert mark.exists() and time.monotonic() - started < 30  # SlowToMake takes 60 s to make
    pids = [int(path.name[3:]) for path in tmp_path.glob("pid*")]
    assert pids and not any(_running(pid) for pid in pids)  # the workers are gone


def test_ctrl_c_is_the_parents_alone(tmp_path):
    # a Ctrl-C reaches a terminal's whole process group: children started in the block ignore it from
    # their first instruction (Python keeps an inherited SIG_IGN), and the parent's handler is back after
    spawn = multiprocessing.get_context("spawn")
    handler = signal.getsignal(signal.SIGINT)
    with children_ignore_ctrl_c():
        inside = spawn.Process(target=signal.raise_signal, args=(signal.SIGINT,))
        inside.start()
    assert signal.getsignal(signal.SIGINT) is handler
    outside = spawn.Process(target=signal.raise_signal, args=(signal.SIGINT,))
    outside.start()
    inside.join(timeout=60)
    outside.join(timeout=60)
    assert inside.exitcode == 0 and outside.exitcode == 1  # 1: a KeyboardInterrupt

    marks = [tmp_path / "closed0", tmp_path / "closed1"]
    envs = SubprocLockstepVectorEnv([functools.partial(MarksItsClose, mark, episode_length=5) for mark in marks],
                                    num_workers=2)
    for process in envs._processes:
        os.kill(process.pid, signal.SIGINT)
    assert envs.reset(seed=[1, 2])[0].shape == (2, 4)  # the workers go on; the parent decides
    envs._processes[0].terminate()  # SIGTERM alone, no "close" request first
    envs._processes[0].join(timeout=30)
    assert marks[0].exists()  # it closed its env: a ViZDoom game left open would keep its engine running
    pids = [process.pid for process in envs._processes]
    envs.close(terminate=True)  # e.g. after a Ctrl-C: the workers end at once
    assert not any(_running(pid) for pid in pids)


def test_a_killed_worker_is_reported_with_its_likely_cause():
    env_fns = [functools.partial(TMazeEnv, episode_length=5)] * 2
    envs = SubprocLockstepVectorEnv(env_fns, num_workers=2)
    try:
        envs.reset(seed=[1, 2])
        assert envs.workers_alive()
        os.kill(envs._processes[1].pid, signal.SIGKILL)  # as the out-of-memory killer does
        envs._processes[1].join(timeout=5)  # gone before the request: the send itself fails
        assert not envs.workers_alive()  # what the app's env pool asks before it uses a kept env
        with pytest.raises(RuntimeError, match=r"env worker 1 ended \(exit code -9\); .*out-of-memory"):
            envs.step([0, 0])
        envs.close()
        envs = SubprocLockstepVectorEnv(env_fns, num_workers=2)
        envs.reset(seed=[1, 2])
        # killed after the request went out: its answer never comes, the other worker's does
        envs._connections[0].send(("step", np.zeros(1, dtype=np.int64)))
        os.kill(envs._processes[1].pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"env worker 1 ended \(exit code -9\); .*out-of-memory"):
            envs._receive_all()
    finally:
        envs.close()
    assert not envs.workers_alive()


def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path):
    script = tmp_path / "plain.py"  # makes envs at import: each spawned worker would import it again
    script.write_text("import functools\n"
                      "from rate_core.envs.subproc import SubprocLockstepVectorEnv\n"
                      "from rate_core.envs.tmaze import TMazeEnv\n"
                      "SubprocLockstepVectorEnv([functools.partial(TMazeEnv, episode_length=5)])\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "before it made its envs" in last and 'must be under `if __name__ == "__main__":`' in last

def test_subproc_vector_env_matches_lockstep_on_memory_maze():
    ours = get_task("memory_maze").make_vector_env(2, step_cap=12, render_mode="rgb_array")  # a worker per env
    reference = LockstepVectorEnv([functools.partial(MemoryMazeEnv, step_cap=12, render_mode="rgb_array")] * 2)
    try:
        assert ours.observation_space.shape == (2, *OBS_SHAPE)
        seeds = [21, 22]
        obs, info = ours.reset(seed=seeds)
        assert_same((obs, info), reference.reset(seed=seeds))
        assert info["target_index"].shape == (2,)
        assert info["target_bearing"].shape == (2,) and set(info["target_bearing"]) <= set(BEARINGS)  # strings pass
        actions = np.random.default_rng(1).integers(6, size=(14, 2))
        for step_actions in actions:  # 2 steps past the cap
            assert_same(ours.step(step_actions), reference.step(step_actions))
        for frame, reference_frame in zip(ours.render(), reference.render(), strict=True):
            np.testing.assert_array_equal(frame, reference_frame)
    finally:
        ours.close()
        reference.close()


def test_bearing_sectors_and_auxiliary_label():
    here, east = (2.0, 2.0), (1.0, 0.0)
    points = {"ahead": (5, 2.3), "ahead-left": (4, 4), "left": (2.2, 6), "behind-left": (0, 3.5),
              "behind": (-3, 1.8), "behind-right": (1, 1), "right": (2.1, -1), "ahead-right": (4, 0.5)}
    assert [bearing(here, east, points[name]) for name in BEARINGS] == list(BEARINGS)
    assert bearing(here, (0.0, 1.0), (2, 5)) == "ahead" and bearing(here, (0.0, 1.0), (5, 2)) == "right"
    assert bearing(here, east, (3, 2 + np.tan(np.radians(22)))) == "ahead"  # the sector edges: +-22.5 degrees
    assert bearing(here, east, (3, 2 + np.tan(np.radians(23)))) == "ahead-left"
    task = get_task("memory_maze")
    assert task.aux_values == BEARINGS and task.aux_classes == 8
    assert task.aux_class({"target_bearing": "left"}) == 2


def test_target_lies_ahead_when_touched(env):
    """The step before each reward the agent rolls into the target: it lies ahead."""
    expert = MemoryMazeExpert(noise=0.0)
    obs, info = env.reset(seed=5)
    expert.reset(env, info)
    before, rewarded = [], 0
    for _ in range(120):
        bearing_before = info["target_bearing"]
        obs, reward, _, truncated, info = env.step(expert.act(env, obs, info))
        if reward:
            rewarded += 1
            before.append(bearing_before)
    assert rewarded >= 2 and set(before) <= {"ahead", "ahead-left", "ahead-right"}


class _Corridors:
    """Stands in for MemoryMazeEnv in the experts: a fixed layout, pose and targets.

        y=2  . . . # .      '#': wall; the agent '@' at (0.5, 0.5) faces +x along the bottom row,
        y=1  . # # # .      target 0 sits at its far end, target 1 up the left column, target 2
        y=0  @ . . . 0      behind the wall in the top right corner.
    """

    maze_layout = np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 1, 0, 1]], dtype=np.uint8)
    targets_pos = np.array([[4.5, 0.5], [0.5, 2.5], [4.5, 2.5]])

    def __init__(self, target_index: int, agent_dir=(1.0, 0.0)):
        self.target_index = target_index
        self.agent_pos, self.agent_dir = np.array([0.5, 0.5]), np.array(agent_dir)
        self.np_random = np.random.default_rng(0)


def test_exploring_expert_remembers_only_targets_it_has_seen():
    env = _Corridors(target_index=0)
    expert = ExploringMemoryMazeExpert(noise=0.0)
    expert.reset(env, {})
    assert expert.act(env, None, None) == 1  # target 0 is straight ahead in view: walk on
    assert expert.seen_targets == {0}  # target 1 is 90 degrees off, target 2 behind a wall
    assert expert.seen[0].all() and not expert.seen[2].any()
    env.target_index = 2
    assert expert.act(env, None, None) == 2  # unseen target: explore the nearest unseen cell, (0, 1) to the left
    env.agent_dir = np.array([0.0, 1.0])  # now facing up the left column
    expert.act(env, None, None)
    assert expert.seen_targets == {0, 1}


def test_exploring_expert_with_a_bounded_recall_forgets_what_it_saw_too_long_ago():
    env = _Corridors(target_index=0)
    expert, forever = ExploringMemoryMazeExpert(noise=0.0, recall=2), ExploringMemoryMazeExpert(noise=0.0)
    expert.reset(env, {})
    forever.reset(env, {})
    for step in (1, 2, 3, 4):
        expert.act(env, None, None)
        forever.act(env, None, None)
        if step == 1:
            env.agent_dir = np.array([-1.0, 0.0])  # turned away: nothing but its own cell in view from now on
        known = step - 1 <= 2  # seen at step 1, remembered for 2 steps
        assert expert.seen_targets == ({0} if known else set()) and forever.seen_targets == {0}, step
        assert expert.seen[0].all() == known and expert.seen[0, 0] and forever.seen[0].all(), step
    # every reachable cell seen within the recall: it heads for the one seen longest ago
    expert.seen_at[np.asarray(_Corridors.maze_layout, bool)] = expert.steps
    expert.seen_at[2, 4] = expert.steps - 1
    assert expert._nearest_unseen(np.array([0.5, 0.5])) == (4, 2)
    with pytest.raises(ValueError, match="recall"):
        ExploringMemoryMazeExpert(recall=-1)
    # the dataset's teacher takes it as an option (collect --teacher --teacher-options recall=90)
    from training.collect import parse_teacher_options

    options = parse_teacher_options(get_task("memory_maze"), ("recall=90",))
    assert options == {"recall": 90.0} and get_task("memory_maze").make_teacher(**options).expert.recall == 90


class _Ring:
    """Stands in for MemoryMazeEnv: a ring of free cells round a wall, the agent '@' at (0.5, 0.5)
    facing +y, up the left column; target 0 at the right end of the middle row.

        y=2  . . . .      the short way to the target runs along the bottom row (4 steps), the long
        y=1  . # # 0      one up the left column and along the top row (6 steps)
        y=0  @ . . .
    """

    maze_layout = np.array([[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=np.uint8)
    targets_pos = np.array([[3.5, 1.5]])

    def __init__(self):
        self.target_index = 0
        self.agent_pos, self.agent_dir = np.array([0.5, 0.5]), np.array([0.0, 1.0])
        self.np_random = np.random.default_rng(0)


def test_seen_only_expert_plans_through_cells_it_has_seen():
    env = _Ring()
    seen_only, layout = ExploringMemoryMazeExpert(noise=0.0, seen_only=True), ExploringMemoryMazeExpert(noise=0.0)
    for expert in (seen_only, layout):
        expert.reset(env, {})
        expert.target_seen_at[0] = 0  # it saw the target once, and the long way round, never the short one
        expert.seen_at[[0, 1, 2, 2, 2, 2, 1], [0, 0, 0, 1, 2, 3, 3]] = 0
    assert layout.act(env, None, None) == 3  # on the layout: turn right, to the short way along the bottom row
    assert seen_only.act(env, None, None) == 1  # on what it saw: straight up the left column
    assert not seen_only.seen[0, 1:].any()  # facing up, it still has not seen the bottom row

    # the target not seen: it explores towards the nearest unseen free cell next to the cells it can reach
    explorer = ExploringMemoryMazeExpert(noise=0.0, seen_only=True)
    explorer.reset(env, {})
    explorer.act(env, None, None)  # sees up the left column: (0, 1) and (0, 2)
    assert explorer.seen[:, 0].all() and explorer.seen.sum() == 3
    assert explorer._frontier((0, 0), explorer.seen) == (1, 0)  # 1 step away; (1, 2) is 3
    explorer.seen_at[explorer.layout] = 1  # everything seen: nothing left to explore
    assert explorer._frontier((0, 0), explorer.seen) is None
    with pytest.raises(ValueError, match="seen_only"):
        ExploringMemoryMazeExpert(seen_only=2)
    # the dataset's teacher takes it as an option (collect --teacher --teacher-options seen_only=1)
    from training.collect import parse_teacher_options

    options = parse_teacher_options(get_task("memory_maze"), ("seen_only=1",))
    assert get_task("memory_maze").make_teacher(**options).expert.seen_only


def test_label_probe_counts_where_two_teachers_agree(capsys):
    from training.label_probe import Args, main, probe

    same = probe("memory_maze", {}, {}, episodes=1, seed=5, early=20, settings={"step_cap": 40})
    assert same["agree"] == same["agree_early"] == 1.0 and same["steps"] == 40
    # a teacher that acts at random half the time labels (with its noise-free expert) as the other's
    noisy = probe("memory_maze", {"noise": 0.5}, {}, episodes=1, seed=5, early=20, settings={"step_cap": 40})
    assert noisy["agree"] == 1.0
    main(Args(b=("seen_only=1",), episodes=1, seed=5, early=20, settings=("step_cap=40",)))
    out = capsys.readouterr().out
    assert "mean return" in out and "of 40 steps" in out and "first 20" in out
    with pytest.raises(SystemExit, match="seen_only"):
        main(Args(b=("seen_onl=1",), episodes=1))


def test_privileged_expert_heads_for_an_unseen_target():
    env = _Corridors(target_index=2)
    expert = MemoryMazeExpert(noise=0.0)
    expert.reset(env, {})
    assert expert.act(env, None, None) == 1  # the shortest path to target 2 starts along the bottom row


def test_teacher_behaves_as_the_noisy_expert_and_labels_with_the_clean_one(env):
    from rate_core.envs.memory_maze import MemoryMazeTeacher
    from training.collect import run_episode

    taught = run_episode(get_task("memory_maze"), {"step_cap": 80}, seed=3, teacher=True)
    plain = run_episode(get_task("memory_maze"), {"step_cap": 80}, seed=3)
    # the same random draws: the teacher's behaviour is the (noisy) expert's, step for step
    np.testing.assert_array_equal(taught["actions"], plain["actions"])
    np.testing.assert_array_equal(taught["observations"], plain["observations"])
    differ = taught["labels"] != taught["actions"]
    assert 0 < differ.sum() < 0.3 * len(differ)  # only at (some) random steps
    # a label is what the noise-free expert does in that state
    teacher, clean = MemoryMazeTeacher(noise=0.1), ExploringMemoryMazeExpert(noise=0.0)
    obs, info = env.reset(seed=4)
    teacher.reset(env, info)
    clean.reset(env, info)
    for _ in range(40):
        action, label = teacher.act_and_label(env, obs, info)
        assert label == clean.act(env, obs, info)
        obs, _, _, _, info = env.step(action)


def test_pursuit_probe_replays_episodes_and_buckets_every_step(tmp_path, capsys):
    from rate_core.checkpoint import save_checkpoint
    from rate_core.model import MemoryTransformer
    from tests.tiny import tiny_config
    from training.collect import collect
    from training.dataset import load_dataset
    from training.pursuit_probe import Args, main, replay

    task = get_task("memory_maze")
    data = load_dataset(collect(task, tmp_path / "heldout", 2, seed=7, teacher=True, overrides={"step_cap": 60}))
    # the replay of a teacher's episode walks the same frames (checked inside) and its rider labels
    # every step as the teacher did
    since, labels, rewards = replay(8, data.actions[60:], observations=data.observations[60:])
    np.testing.assert_array_equal(labels, data.labels[60:])
    np.testing.assert_array_equal(rewards, data.rewards[60:])
    assert (since >= -1).all() and (since[since > 0] <= np.arange(60)[since > 0]).all()
    model = MemoryTransformer(tiny_config("rate", obs_kind="image", obs_shape=OBS_SHAPE, act_dim=len(ACTIONS)),
                              task=task.name)
    save_checkpoint(model, tmp_path / "model")
    main(Args(checkpoint=str(tmp_path / "model"), data=tmp_path / "heldout", episodes=2, steps=50))
    out = capsys.readouterr().out
    assert "2 teacher episodes" in out and "2 of its own (seeds 0-1" in out
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 2][1:]
    assert [row[0].strip() for row in rows] == ["in view", "1-30", "31-90", "91-270", ">270", "never"]
    for part in (1, 2):  # the buckets share out every step
        assert sum(float(row[part].split()[0]) for row in rows) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(SystemExit, match="checkpoint folder does not exist"):
        main(Args(checkpoint=str(tmp_path / "nothing")))
