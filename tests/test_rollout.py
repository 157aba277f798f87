"""The rollout engine's cached step-by-step inference equals recomputing everything."""

import numpy as np
import pytest
import torch

from rate_core.model import ACTION_PAD
from rate_core.rollout import make_policy, run_episodes
from rate_core.tasks import get_task
from tests.tiny import ALL_VARIANTS, K, N, random_batch, tiny_model


def recomputed_logits(model, rtg, obs, actions, t):
    """Logits of step t from scratch: full passes over finished segments, then the current one."""
    if model.config.mode == "dt":
        start = max(0, t + 1 - model.config.segment_steps)
        window = slice(start, t + 1)
        acts = actions[:, window].clone()
        acts[:, -1] = ACTION_PAD
        return model(rtg[:, window], obs[:, window], acts)[0][:, -1]
    state = None
    segment_start = t - t % K
    for start in range(0, segment_start, K):
        _, state = model(rtg[:, start:start + K], obs[:, start:start + K], actions[:, start:start + K], state)
    acts = actions[:, segment_start:t + 1].clone()
    acts[:, -1] = ACTION_PAD
    return model(rtg[:, segment_start:t + 1], obs[:, segment_start:t + 1], acts, state)[0][:, -1]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_cached_policy_equals_recompute(variant):
    model = tiny_model(variant)
    steps = 3 * K * N + 2  # beyond DT's window, and more than three segments
    rtg, obs, actions = random_batch(model.config, batch=3, steps=steps)
    policy = make_policy(model, 3)
    with torch.no_grad():
        for t in range(steps):
            logits = policy.logits(rtg[:, t], obs[:, t])
            expected = recomputed_logits(model, rtg, obs, actions, t)
            assert torch.allclose(logits, expected, atol=1e-5), (variant, t, (logits - expected).abs().max())
            policy.record_action(actions[:, t])


def reference_episode(model, task, settings, seed, target_return):
    """One env, recomputing every step from the full history: the slow, obvious way."""
    env = task.make_env(**settings)
    obs, _ = env.reset(seed=seed)
    rtgs, observations, actions = [], [], []
    rtg, total, t = target_return, 0.0, 0
    while True:
        rtgs.append(rtg)
        observations.append(obs)
        actions.append(0)
        r, o, a = (torch.tensor(np.array(x))[None] for x in (rtgs, observations, actions))
        with torch.no_grad():
            action = int(recomputed_logits(model, r.float(), o.float(), a, t).argmax(-1))
        actions[-1] = action
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
        rtg -= reward
        t += 1
        if terminated or truncated:
            return total, t


@pytest.mark.parametrize("variant", ["rate", "trxl", "dt"])
def test_batched_episodes_match_single_env_reference(variant):
    task = get_task("tmaze")
    model = tiny_model(variant)
    settings = {"episode_length": 3 * K + 3}
    seeds = list(range(6))
    env = task.make_vector_env(len(seeds), **settings)
    outcome = run_episodes(model, env, seeds, target_return=1.0)
    for i, seed in enumerate(seeds):
        total, length = reference_episode(model, task, settings, seed, 1.0)
        assert (outcome.returns[i], outcome.lengths[i]) == (total, length), i
