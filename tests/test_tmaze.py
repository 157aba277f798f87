"""T-Maze mechanics, the gymnasium contract, and the batched version's equality with the single env."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rate_core.envs.tmaze import BACK, DOWN, FORWARD, UP, TMazeEnv, TMazeVectorEnv


def oracle_actions(env_cue: int, episode_length: int) -> list[int]:
    return [FORWARD] * (episode_length - 2) + [UP if env_cue > 0 else DOWN]


def test_passes_gymnasium_env_checker():
    check_env(TMazeEnv(episode_length=10), skip_render_check=True)


@pytest.mark.parametrize("seed", range(6))
def test_oracle_succeeds_in_length_minus_one_steps(seed):
    env = TMazeEnv(episode_length=12)
    obs, info = env.reset(seed=seed)
    assert obs[1] == info["cue"] and info["cue"] in (-1, 1)
    for t, action in enumerate(oracle_actions(info["cue"], 12)):
        obs, reward, terminated, truncated, info = env.step(action)
        if t < 9:
            assert obs[1] == 0 and obs[2] == 0 and not terminated  # cue shown once; not yet at the junction
        elif t == 9:
            assert obs[2] == 1  # standing at the junction
    assert terminated and not truncated and reward == 1.0 and info["success"] and t == 10
    assert obs[0] == info["cue"]


def test_wrong_side_fails_and_invalid_moves_stay():
    env = TMazeEnv(episode_length=6)
    env.reset(seed=3)
    env.step(BACK)  # off the corridor: stays at x = 0
    assert env._position.tolist() == [0, 0]
    env.step(UP)  # turning outside the junction: stays
    assert env._position.tolist() == [0, 0]
    obs, info = env.reset(seed=3)
    for _ in range(4):
        env.step(FORWARD)
    obs, reward, terminated, truncated, info = env.step(DOWN if info["cue"] > 0 else UP)
    assert terminated and reward == 0.0 and not info["success"]
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(FORWARD)


def test_truncates_at_episode_length():
    env = TMazeEnv(episode_length=5)
    env.reset(seed=0)
    for t in range(5):
        obs, reward, terminated, truncated, info = env.step(BACK)
    assert truncated and not terminated and reward == 0.0


def test_noise_is_a_distractor_in_minus_one_zero_one():
    env = TMazeEnv(episode_length=200)
    obs, _ = env.reset(seed=1)
    values = {obs[3]}
    for _ in range(150):
        values.add(env.step(FORWARD)[0][3])
    assert values == {-1.0, 0.0, 1.0}


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="episode_length"):
        TMazeEnv(episode_length=2)
    env = TMazeEnv()
    env.reset(seed=0)
    for bad in (7, 1.7, -0.5, True, np.float64(2.0)):  # whole numbers in 0..3 only: 1.7 is not action 1
        with pytest.raises(ValueError, match="invalid T-Maze action"):
            env.step(bad)
    assert env.step(np.int64(0))[0].shape == (4,) and env.step(np.array(0))[0].shape == (4,)
    with pytest.raises(ValueError, match="whole-number actions in 0..3"):
        TMazeVectorEnv(2).step(np.array([1.7, 0.0]))
    with pytest.raises(ValueError, match="num_envs must be at least 1"):
        TMazeVectorEnv(0)
    with pytest.raises(ValueError, match="reset_mask is not supported"):
        TMazeVectorEnv(2).reset(options={"reset_mask": np.array([True, False])})


def test_vector_env_equals_single_envs():
    rng = np.random.default_rng(0)
    length, n = 9, 16
    vec = TMazeVectorEnv(n, episode_length=length)
    singles = [TMazeEnv(episode_length=length) for _ in range(n)]
    obs, info = vec.reset(seed=100)
    for i, env in enumerate(singles):
        single_obs, single_info = env.reset(seed=100 + i)
        assert np.array_equal(obs[i], single_obs) and info["cue"][i] == single_info["cue"]
    done = np.zeros(n, dtype=bool)
    for _ in range(length):
        # mostly forward, sometimes anything: some envs finish early, some truncate
        actions = np.where(rng.random(n) < 0.7, FORWARD, rng.integers(0, 4, n))
        obs, reward, terminated, truncated, info = vec.step(actions)
        for i, env in enumerate(singles):
            if done[i]:
                assert reward[i] == 0 and not terminated[i] and not truncated[i]
                continue
            s_obs, s_reward, s_term, s_trunc, _ = env.step(actions[i])
            assert np.array_equal(obs[i], s_obs), i
            assert (reward[i], terminated[i], truncated[i]) == (s_reward, s_term, s_trunc), i
            done[i] = s_term or s_trunc
    assert done.all()
    for _ in range(3):  # resets without a seed go on from each env's generator, as the single envs' do
        obs, info = vec.reset()
        for i, env in enumerate(singles):
            single_obs, single_info = env.reset()
            assert np.array_equal(obs[i], single_obs) and info["cue"][i] == single_info["cue"]


def test_vector_env_refuses_a_step_before_reset_and_ignores_finished_envs_actions():
    vec = TMazeVectorEnv(2, episode_length=5)
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        vec.step(np.array([FORWARD, FORWARD]))
    vec.reset(seed=0)
    for _ in range(3):
        vec.step(np.array([FORWARD, BACK]))  # the first env reaches the junction (the oracle's T - 1 = 4 steps)
    _, _, terminated, _, _ = vec.step(np.array([UP, BACK]))
    assert terminated[0] and not vec.done[1]
    # as the single env and the lockstep env: a finished env's action is not looked at (the engine sends 0)
    _, reward, terminated, truncated, _ = vec.step(np.array([-10, BACK]))
    assert reward[0] == 0 and not terminated[0] and not truncated[0] and truncated[1]
    with pytest.raises(ValueError, match="whole-number actions in 0..3"):  # an active env's action still counts
        TMazeVectorEnv(1, episode_length=3).step(np.array([7]))
