"""Minigrid-Memory: the environment wrapper, its batched lockstep version, and the expert."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rate_core.envs.minigrid_memory import (
    CLOSE_UP_TILE, FRAME_PIXELS, MAP_ROWS, VIEW_GAP, MinigridMemoryEnv, MinigridMemoryExpert,
)
from rate_core.tasks import get_task
from training.collect import run_episode

TASK = get_task("minigrid_memory")


def test_env_passes_the_gymnasium_checker_and_has_the_documented_spaces():
    env = MinigridMemoryEnv(size=11)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs.shape == (3, 84, 84) and obs.dtype == np.uint8 and info["cue"] in (0, 1)
    with pytest.raises(ValueError, match="expected 0"):
        env.step(3)
    with pytest.raises(ValueError, match="odd"):
        MinigridMemoryEnv(size=40)


def test_step_cap_truncates_and_rewards_follow_minigrid():
    env = MinigridMemoryEnv(size=11, step_cap=5)
    env.reset(seed=1)
    results = [env.step(0) for _ in range(5)]  # turning in place never ends an episode
    assert [r[3] for r in results] == [False] * 4 + [True] and all(r[1] == 0 for r in results)
    # minigrid's own limit, 5 * size**2 = 245 steps on a grid of 7, ends an episode before a larger step cap:
    # past it, minigrid's reward for the right object would be below 0
    env = MinigridMemoryEnv(size=7, step_cap=500)
    env.reset(seed=1)
    results = [env.step(0) for _ in range(245)]
    assert [r[3] for r in results] == [False] * 244 + [True] and not any(r[2] for r in results)
    # the limit the task states (the app's "at most N steps") is that one, and minigrid's own
    task = get_task("minigrid_memory")
    assert task.episode_limit({"size": 7}) == 245 == env.grid_env.max_steps
    assert task.episode_limit({"size": 9, "step_cap": 500}) == 405 == MinigridMemoryEnv(size=9).grid_env.max_steps
    assert task.episode_limit({"size": 11, "step_cap": 500}) == 500
    assert task.episode_limit({"size": 11, "step_cap": 5}) == 5
    # the other tasks' limit is their setting, the task's default where none is given
    assert [get_task(name).episode_limit({}) for name in ("tmaze", "vizdoom_two_colors", "memory_maze")] == \
        [150, 2100, 1000]
    assert get_task("memory_maze").episode_limit({"step_cap": 300}) == 300


def test_expert_sees_the_cue_then_reaches_the_matching_object():
    env = MinigridMemoryEnv(size=21)
    for seed in range(10):
        expert = MinigridMemoryExpert()
        obs, info = env.reset(seed=seed)
        expert.reset(env, info)
        seen, steps = env.cue_in_view(), 0
        while True:
            obs, reward, terminated, truncated, info = env.step(expert.act(env, obs, info))
            steps += 1
            seen = seen or env.cue_in_view()
            if terminated or truncated:
                break
        assert seen and info["success"] and reward == pytest.approx(1 - 0.9 * steps / (5 * 21**2))


@pytest.mark.parametrize("look_by_cue, low, high", [(1.0, 1.0, 1.0), (0.8, 0.72, 0.88)])
def test_expert_looks_first_to_the_side_its_cue_sets(look_by_cue, low, high):
    env, expert = MinigridMemoryEnv(size=11), MinigridMemoryExpert(look_by_cue=look_by_cue)
    by_rule = []
    for seed in range(300):
        _, info = env.reset(seed=seed)
        expert.reset(env, info)
        by_rule.append(expert.look_dir == (3 if info["cue"] == 0 else 1))  # north for a key
    assert low <= np.mean(by_rule) <= high


def test_expert_episodes_differ_succeed_at_41_and_repeat_with_their_seed():
    episodes = [run_episode(TASK, {"size": 41}, seed) for seed in range(6)]
    assert all(e["success"] for e in episodes)
    assert len({len(e["actions"]) for e in episodes}) > 1
    again = run_episode(TASK, {"size": 41}, 3)
    assert np.array_equal(again["actions"], episodes[3]["actions"])


def test_lockstep_vector_env_equals_single_envs_and_leaves_finished_ones_alone():
    vector = TASK.make_vector_env(3, size=11, step_cap=4, render_mode="rgb_array")
    singles = [TASK.make_env(size=11, step_cap=4) for _ in range(3)]
    seeds = [3, 4, 5]
    obs, info = vector.reset(seed=seeds)
    for env, seed, o in zip(singles, seeds, obs, strict=True):
        assert np.array_equal(env.reset(seed=seed)[0], o)
    rng = np.random.default_rng(0)
    done = [False] * 3
    for _ in range(6):  # the cap ends every episode after 4 steps (or earlier at an object)
        actions = rng.integers(0, 3, size=3)
        obs, reward, terminated, truncated, info = vector.step(actions)
        for i, env in enumerate(singles):
            if done[i]:  # finished: not stepped again
                assert reward[i] == 0 and not terminated[i] and not truncated[i]
                continue
            o, r, te, tr, _ = env.step(actions[i])
            assert np.array_equal(o, obs[i]) and (r, te, tr) == (reward[i], terminated[i], truncated[i])
            done[i] = te or tr
    assert all(done)
    frames = vector.render()
    assert len(frames) == 3 and frames[0].ndim == 3
    assert set(info) >= {"cue", "success"} and info["cue"].shape == (3,)


def _agent_columns(image: np.ndarray) -> np.ndarray:
    """The x of the pixels of the agent's red triangle (lightened where minigrid highlights it)."""
    red = (image[..., 0] > 200) & (image[..., 1] < 110) & (image[..., 2] < 110)
    return np.nonzero(red)[1]


@pytest.mark.parametrize("size", [7, 41, 201])
def test_render_shows_the_hallway_the_agent_and_its_view_beside_it(size):
    env = MinigridMemoryEnv(size=size, render_mode="rgb_array")
    obs, _ = env.reset(seed=1)
    frame = env.render()
    view = obs.transpose(1, 2, 0).repeat(2, 0).repeat(2, 1)
    assert frame.dtype == np.uint8
    assert np.array_equal(frame[:view.shape[0], -view.shape[1]:], view)
    tile = max(3, FRAME_PIXELS // size)
    close_up = tile < CLOSE_UP_TILE  # small cells: a close-up of the agent above the map, larger
    top = MAP_ROWS * CLOSE_UP_TILE + VIEW_GAP if close_up else 0

    def parts(image):  # (the map: only the rows around the hallway, the close-up or None)
        return (image[top:top + MAP_ROWS * tile, :size * tile],
                image[:MAP_ROWS * CLOSE_UP_TILE, :size * tile] if close_up else None)

    overview, near = parts(frame)
    assert frame.shape == (max(view.shape[0], top + MAP_ROWS * tile), size * tile + VIEW_GAP + view.shape[1], 3)
    if size <= 41:  # green in the cells of the cue (start room) and of the two objects (the hallway's end)
        green = (overview[..., 1] > 200) & (overview[..., 0] < 60)
        cells = {(y // tile, x // tile) for y, x in zip(*np.nonzero(green), strict=True)}
        assert cells == {(1, 1), (0, size - 2), (MAP_ROWS - 1, size - 2)}
    assert _agent_columns(overview).mean() // tile == env.agent_pos[0]
    for _ in range(2):
        obs, *_ = env.step(2)  # forward, east along the hallway: the view and the agent follow
    moved = env.render()
    assert moved.shape == frame.shape
    shown = obs.transpose(1, 2, 0).repeat(2, 0).repeat(2, 1)
    assert np.array_equal(moved[:view.shape[0], -view.shape[1]:], shown)
    overview, near = parts(moved)
    assert _agent_columns(overview).mean() // tile == env.agent_pos[0]
    if close_up:
        assert _agent_columns(near).size > (CLOSE_UP_TILE / tile) ** 2 / 2 * _agent_columns(overview).size
    assert _agent_columns(moved[:, :size * tile]).size == _agent_columns(overview).size + (
        _agent_columns(near).size if close_up else 0)  # the agent is drawn nowhere else


def test_a_step_after_the_episode_ended_or_before_reset_is_refused():
    from rate_core.envs.lockstep import LockstepVectorEnv

    env = MinigridMemoryEnv(size=11, step_cap=2)
    with pytest.raises(RuntimeError, match=r"call reset\(\) first"):
        env.step(0)
    env.reset(seed=1)
    env.step(0)
    assert env.step(0)[3]  # truncated by the step cap
    with pytest.raises(RuntimeError, match=r"episode is over; call reset\(\) first"):  # no second reward
        env.step(0)
    vector = LockstepVectorEnv([lambda: MinigridMemoryEnv(size=11)] * 2)
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        vector.step(np.zeros(2, dtype=np.int64))
    vector.close()
