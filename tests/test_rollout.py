"""The rollout engine's cached step-by-step inference equals recomputing everything."""

import numpy as np
import pytest
import torch

from rate_core.model import ACTION_PAD
from rate_core.rollout import make_policy, run_episodes, sample_actions
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


@pytest.mark.parametrize("action_inputs", [True, False])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_cached_policy_equals_recompute(variant, action_inputs):
    model = tiny_model(variant, action_inputs=action_inputs)
    steps = 3 * K * N + 2  # beyond DT's window, and more than three segments
    rtg, obs, actions = random_batch(model.config, batch=3, steps=steps)
    policy = make_policy(model, 3)
    with torch.no_grad():
        for t in range(steps):
            logits = policy.logits(rtg[:, t], obs[:, t])
            expected = recomputed_logits(model, rtg, obs, actions, t)
            assert torch.allclose(logits, expected, atol=1e-5), (variant, t, (logits - expected).abs().max())
            policy.record_action(actions[:, t])


@pytest.mark.parametrize("horizon", [1, 2, 3, 100])
@pytest.mark.parametrize("variant", [v for v in ALL_VARIANTS if v != "dt"])
def test_memory_horizon_acts_as_if_the_episode_began_that_many_segments_back(variant, horizon):
    model = tiny_model(variant)
    steps = 5 * K + 2
    rtg, obs, actions = random_batch(model.config, batch=3, steps=steps)
    policy = make_policy(model, 3, memory_horizon=horizon)
    rows = torch.arange(3)
    with torch.no_grad():
        for t in range(steps):
            if t == 3 * K + 1:  # an env finishes: its row leaves the batch, the kept segments follow
                rows = torch.tensor([0, 2])
                policy.select(rows)
            logits = policy.logits(rtg[rows, t], obs[rows, t])
            start = max(0, t // K - horizon + 1) * K  # the first step of the oldest segment it may see
            window = slice(start, None)
            expected = recomputed_logits(model, rtg[rows, window], obs[rows, window], actions[rows, window], t - start)
            assert torch.allclose(logits, expected, atol=1e-5), (variant, horizon, t)
            policy.record_action(actions[rows, t])


def test_memory_horizon_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="at least 1"):
        make_policy(tiny_model("rate"), 2, memory_horizon=0)
    with pytest.raises(ValueError, match="DT sees a fixed window"):
        make_policy(tiny_model("dt"), 2, memory_horizon=2)


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


class RaggedVectorEnv:
    """Random observations and rewards; env i ends after lengths[i] steps (autoreset disabled)."""

    def __init__(self, lengths, obs_dim=4):
        self.lengths = np.asarray(lengths)
        self.num_envs = len(lengths)
        self.obs_dim = obs_dim

    def reset(self, seed=None):
        self.rng = np.random.default_rng(seed)
        self.t = np.zeros(self.num_envs, dtype=np.int64)
        return self.rng.normal(size=(self.num_envs, self.obs_dim)).astype(np.float32), {"tag": np.arange(self.num_envs)}

    def step(self, actions):
        active = self.t < self.lengths
        self.t += active
        obs = self.rng.normal(size=(self.num_envs, self.obs_dim)).astype(np.float32)
        reward = np.where(active, self.rng.random(self.num_envs), 0.0)
        terminated = active & (self.t == self.lengths)
        return obs, reward, terminated, np.zeros(self.num_envs, dtype=bool), {"success": terminated & (actions == 1)}



def test_traces_say_which_episodes_max_steps_cut_short():
    # the envs end the first episode at step 4 and the third at 6; max_steps = 6 stops the second, which would go on
    batch = run_episodes(tiny_model("rate"), RaggedVectorEnv([4, 9, 6]), seeds=[0, 1, 2], target_return=1.0,
                         trace=True, max_steps=6)
    assert batch.lengths.tolist() == [4, 6, 6]
    assert [trace.cut_short for trace in batch.traces] == [False, True, False]  # the third ended at its 6th step
    played_out = run_episodes(tiny_model("rate"), RaggedVectorEnv([4, 6]), seeds=[0, 1], target_return=1.0, trace=True)
    assert [trace.cut_short for trace in played_out.traces] == [False, False]

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_engine_logits_equal_recompute_with_envs_ending_at_different_steps(variant):
    model = tiny_model(variant)
    lengths = [3 * K + 1, 5, 3 * K * N + 2, K, 2 * K + 3]  # more than three segments, ragged ends
    batch = run_episodes(model, RaggedVectorEnv(lengths), seeds=[7] * 5, target_return=[1.0, 2.0, 0.5, 3.0, 1.5],
                         sample=True, trace=True, observations=True)
    assert batch.lengths.tolist() == lengths
    assert batch.model_steps == sum(lengths)  # finished envs cost no model work
    for trace in batch.traces:
        rtg = torch.tensor(trace.returns_to_go)[None]
        obs = torch.tensor(trace.observations[: trace.length])[None]
        actions = torch.tensor(trace.actions)[None]
        assert trace.observations.shape[0] == trace.length + 1
        with torch.no_grad():
            for t in range(trace.length):
                expected = recomputed_logits(model, rtg, obs, actions, t)[0]
                assert torch.allclose(torch.tensor(trace.logits[t]), expected, atol=1e-5), (variant, t)
        assert np.allclose(trace.probs.sum(-1), 1.0, atol=1e-5)
        assert np.allclose(trace.returns_to_go[1:], trace.returns_to_go[:-1] - trace.rewards[:-1], atol=1e-5)


def test_sample_actions_inverts_the_cumulative_distribution():
    probs = torch.tensor([[0.2, 0.5, 0.3]] * 6)
    uniform = torch.tensor([0.0, 0.2, 0.21, 0.69, 0.71, 0.9999999])
    assert sample_actions(probs, uniform).tolist() == [0, 0, 1, 1, 2, 2]
    short = torch.tensor([[0.5, 0.4999]])  # a cumulative sum that falls short of the draw: the last action
    assert sample_actions(short, torch.tensor([0.99995])).tolist() == [1]
    zero_last = torch.tensor([[0.5, 0.4999, 0.0]])  # ... of nonzero probability
    assert sample_actions(zero_last, torch.tensor([0.99995])).tolist() == [1]
    zero_first = torch.tensor([[0.0, 0.12, 0.88]])  # a draw of exactly 0: the first action of nonzero probability
    assert sample_actions(zero_first, torch.tensor([0.0])).tolist() == [1]
    draws = sample_actions(probs[:1].expand(20000, 3), torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    assert np.allclose(np.bincount(draws.numpy(), minlength=3) / 20000, [0.2, 0.5, 0.3], atol=0.015)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_actions_are_draws_from_the_tempered_softmax(temperature):
    model = tiny_model("rate")
    batch = run_episodes(model, RaggedVectorEnv([2 * K + 3]), seeds=[7], target_return=1.0, sample=True,
                         sample_seed=4, trace=True, temperature=temperature)
    trace = batch.traces[0]
    probs = torch.tensor(trace.logits / temperature).softmax(-1).numpy()
    assert np.allclose(trace.probs, probs, atol=1e-6)
    rng = np.random.default_rng([4, 7])
    drawn = [min(int((np.cumsum(p) < rng.random()).sum()), len(p) - 1) for p in trace.probs]
    assert trace.actions.tolist() == drawn


def test_sampled_episode_does_not_depend_on_its_batch():
    model = tiny_model("rate")
    task = get_task("tmaze")
    settings = {"episode_length": 2 * K + 5}
    together = run_episodes(model, task.make_vector_env(4, **settings), [10, 11, 12, 13], 1.0, sample=True,
                            sample_seed=3, trace=True)
    alone = run_episodes(model, task.make_vector_env(1, **settings), [12], 1.0, sample=True, sample_seed=3, trace=True)
    assert np.array_equal(together.traces[2].actions, alone.traces[0].actions)
    again = run_episodes(model, task.make_vector_env(4, **settings), [10, 11, 12, 13], 1.0, sample=True,
                         sample_seed=3, trace=True)
    assert all(np.array_equal(a.actions, b.actions) for a, b in zip(together.traces, again.traces, strict=True))
    other = run_episodes(model, task.make_vector_env(4, **settings), [10, 11, 12, 13], 1.0, sample=True,
                         sample_seed=4, trace=True)
    assert any(not np.array_equal(a.actions, b.actions) for a, b in zip(together.traces, other.traces, strict=True))


@pytest.mark.parametrize("variant", ["rate", "dt"])
def test_actions_hidden_at_probability_one_play_as_a_model_without_action_inputs(variant):
    import copy
    from dataclasses import replace

    model = tiny_model(variant)
    blind = copy.deepcopy(model)
    blind.config = replace(model.config, action_inputs=False)  # the same weights, every action token the unknown one
    task = get_task("tmaze")
    settings = {"episode_length": 2 * K + 5}
    hidden = run_episodes(model, task.make_vector_env(3, **settings), [4, 5, 6], 1.0, sample=True, sample_seed=2,
                          trace=True, hide_actions=1.0)
    without = run_episodes(blind, task.make_vector_env(3, **settings), [4, 5, 6], 1.0, sample=True, sample_seed=2,
                           trace=True)
    shown = run_episodes(model, task.make_vector_env(3, **settings), [4, 5, 6], 1.0, sample=True, sample_seed=2,
                         trace=True)
    for a, b in zip(hidden.traces, without.traces, strict=True):
        assert np.array_equal(a.actions, b.actions) and np.allclose(a.logits, b.logits, atol=1e-5)
    assert any(not np.allclose(a.logits, b.logits, atol=1e-3) for a, b in zip(hidden.traces, shown.traces, strict=True))


def test_hidden_actions_are_drawn_per_episode_and_checked():
    model = tiny_model("rate")
    task = get_task("tmaze")
    settings = {"episode_length": 2 * K + 5}
    together = run_episodes(model, task.make_vector_env(4, **settings), [10, 11, 12, 13], 1.0, sample=True,
                            sample_seed=3, trace=True, hide_actions=0.5)
    alone = run_episodes(model, task.make_vector_env(1, **settings), [12], 1.0, sample=True, sample_seed=3,
                         trace=True, hide_actions=0.5)
    assert np.array_equal(together.traces[2].actions, alone.traces[0].actions)
    assert np.allclose(together.traces[2].logits, alone.traces[0].logits, atol=1e-5)
    shown = run_episodes(model, task.make_vector_env(4, **settings), [10, 11, 12, 13], 1.0, sample=True,
                         sample_seed=3, trace=True, hide_actions=0.0)
    assert any(not np.allclose(a.logits, b.logits, atol=1e-3)
               for a, b in zip(together.traces, shown.traces, strict=True))
    with pytest.raises(ValueError, match="probability in \\[0, 1\\]"):
        run_episodes(model, task.make_vector_env(1, **settings), [1], 1.0, hide_actions=1.5)



def test_nudge_pixels_moves_values_by_one_level_at_the_given_rate_and_clips():
    from rate_core.rollout import nudge_pixels

    frame = np.random.default_rng(0).integers(0, 256, (3, 84, 84), dtype=np.uint8)
    frame[0] = 0
    frame[1] = 255
    nudged = nudge_pixels(frame, np.random.default_rng(1), 0.2)
    moved = nudged.astype(int) - frame.astype(int)
    assert nudged.dtype == np.uint8 and set(np.unique(moved)) <= {-1, 0, 1}
    assert 0.18 < (moved[2] != 0).mean() < 0.22  # each value drawn with probability 0.2 moves by one level
    assert (moved[0] >= 0).all() and (moved[1] <= 0).all() and (moved[0] == 1).any() and (moved[1] == -1).any()
    assert np.array_equal(nudge_pixels(frame, np.random.default_rng(1), 0.0), frame)


def test_pixel_noise_is_drawn_per_episode_changes_only_what_the_model_sees_and_is_checked():
    task = get_task("minigrid_memory")
    model = tiny_model("rate", obs_kind="image", obs_shape=task.obs_shape, act_dim=task.act_dim)
    settings = {"size": 11, "step_cap": 2 * K + 3}

    def play(seeds, **options):
        return run_episodes(model, task.make_vector_env(len(seeds), **settings), seeds, 1.0, sample=True,
                            sample_seed=3, trace=True, observations=True, **options)

    together, alone = play([10, 11, 12], pixel_noise=0.3), play([11], pixel_noise=0.3)
    assert np.array_equal(together.traces[1].actions, alone.traces[0].actions)
    assert np.allclose(together.traces[1].logits, alone.traces[0].logits, atol=1e-5)
    clean = play([10, 11, 12])
    assert np.allclose(play([10, 11, 12], pixel_noise=0.0).traces[0].logits, clean.traces[0].logits, atol=1e-6)
    # the first step's frame is the same env frame in both; only what the model made of it differs
    first = [(a.observations[0], b.observations[0], a.logits[0], b.logits[0])
             for a, b in zip(together.traces, clean.traces, strict=True)]
    assert all(np.array_equal(obs_a, obs_b) for obs_a, obs_b, _, _ in first)
    assert any(not np.allclose(la, lb, atol=1e-4) for _, _, la, lb in first)
    with pytest.raises(ValueError, match="pixel_noise is a probability in \\[0, 1\\]"):
        play([1], pixel_noise=-0.5)
    tmaze = get_task("tmaze")
    with pytest.raises(ValueError, match="pixel_noise needs image observations"):
        run_episodes(tiny_model("rate"), tmaze.make_vector_env(1, episode_length=2 * K + 5), [1], 1.0,
                     pixel_noise=0.1)


def test_run_episodes_refuses_what_it_cannot_play_and_leaves_the_models_mode_alone():
    model = tiny_model("rate").train()
    tmaze = get_task("tmaze")
    env = tmaze.make_vector_env(2, episode_length=K + 2)
    for kwargs, message in [(dict(temperature=0.0, sample=True), "temperature must be a positive number"),
                            (dict(temperature=-1.0), "temperature must be a positive number"),
                            (dict(max_steps=0), "max_steps must be a whole number, at least 1"),
                            (dict(max_steps=2.5), "max_steps must be a whole number, at least 1"),
                            (dict(target_return=[1.0, 1.0, 1.0]), r"one finite number or one per env \(2\)"),
                            (dict(seeds=5), r"seeds: one whole number from 0 per env \(2\), e.g. range\(2\), got 5"),
                            (dict(seeds=None), "seeds: one whole number from 0 per env"),
                            (dict(seeds=[None, None], sample=True), "seeds: one whole number from 0 per env"),
                            (dict(seeds=[1, 2, 3]), "seeds: one whole number from 0 per env"),
                            (dict(seeds=[1, -2]), "seeds: one whole number from 0 per env"),
                            (dict(sample_seed=-1, sample=True), "sample_seed must be a whole number from 0")]:
        with pytest.raises(ValueError, match=message):
            run_episodes(model, env, **{"seeds": [1, 2], "target_return": 1.0, **kwargs})
    run_episodes(model, env, np.array([1, 2]), 1.0, max_steps=1)  # numpy's whole numbers are whole numbers
    with pytest.raises(ValueError, match="needs a vector env .* got TMazeEnv"):
        run_episodes(model, tmaze.make_env(episode_length=K + 2), [1], 1.0)
    minigrid = get_task("minigrid_memory").make_vector_env(1, size=7)
    with pytest.raises(ValueError, match=r"does not fit the env \(observations \(3, 84, 84\)"):
        run_episodes(model, minigrid, [1], 1.0)
    assert model.training  # refused before it changed anything
    modes = []
    hook = model.obs_encoder.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    run_episodes(model, env, [1, 2], 1.0)
    hook.remove()
    assert modes and not any(modes) and model.training  # played in eval mode, and given back in training mode
    run_episodes(model.eval(), env, [1, 2], 1.0)
    assert not model.training

def test_trace_records_memory_updates_and_attention_on_memory():
    model = tiny_model("rate")
    steps = 3 * K + 2
    batch = run_episodes(model, RaggedVectorEnv([steps, 2 * K]), seeds=[1, 1], target_return=1.0, trace=True,
                         observations=True)
    trace = batch.traces[0]
    assert trace.memory_update_steps == [K - 1, 2 * K - 1, 3 * K - 1]
    assert trace.memory.shape == (4, model.config.num_mem_tokens, model.config.d_model)
    assert np.allclose(trace.memory[0], model.initial_memory.detach().numpy())
    # the memory after the first update is what a full forward pass over the first segment gives
    rtg = torch.tensor(trace.returns_to_go)[None, :K]
    obs = torch.tensor(trace.observations[:K])[None]
    with torch.no_grad():
        _, state = model(rtg, obs, torch.tensor(trace.actions[:K])[None])
    assert np.allclose(trace.memory[1], state.memory[0].numpy(), atol=1e-5)
    assert trace.memory_attention.shape == (steps, model.config.n_layer)
    assert ((trace.memory_attention > 0) & (trace.memory_attention < 1)).all()
    assert batch.traces[1].memory.shape[0] == 3  # two updates before its end
    assert trace.reset_info == {"tag": 0} and batch.traces[1].reset_info == {"tag": 1}
    assert trace.info["success"].shape == (steps,)


def test_dt_trace_has_no_memory():
    model = tiny_model("dt")
    batch = run_episodes(model, RaggedVectorEnv([K + 1]), seeds=[0], target_return=1.0, trace=True)
    assert batch.traces[0].memory is None and batch.traces[0].memory_attention is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("variant", ["rate_cached", "dt"])
def test_engine_on_cuda_matches_cpu(variant):
    model = tiny_model(variant, aux_classes=2)
    cpu = run_episodes(model, RaggedVectorEnv([2 * K + 1, K + 2]), seeds=[5, 5], target_return=1.0, trace=True)
    gpu = run_episodes(model.to("cuda"), RaggedVectorEnv([2 * K + 1, K + 2]), seeds=[5, 5], target_return=1.0,
                       trace=True)
    for a, b in zip(cpu.traces, gpu.traces, strict=True):
        assert np.allclose(a.logits, b.logits, atol=1e-4)
        assert np.allclose(a.aux_probs, b.aux_probs, atol=1e-4)


@pytest.mark.parametrize("variant", ["rate", "dt"])
def test_cached_policy_reads_the_auxiliary_head_as_a_recompute_does(variant):
    """The engine records, step by step, what an auxiliary head (train --aux-weight) reads: the same
    probabilities as the model's segment() on the history from scratch."""
    model = tiny_model(variant, aux_classes=2)
    steps = 2 * K * N + 1
    rtg, obs, actions = random_batch(model.config, batch=2, steps=steps)
    policy = make_policy(model, 2)
    with torch.no_grad():
        for t in range(steps):
            policy.logits(rtg[:, t], obs[:, t])
            if variant == "dt":
                start = max(0, t + 1 - model.config.segment_steps)
                acts = actions[:, start:t + 1].clone()
                acts[:, -1] = ACTION_PAD
                aux = model.segment(rtg[:, start:t + 1], obs[:, start:t + 1], acts)[1][:, -1]
            else:
                state, first = None, t - t % K
                for start in range(0, first, K):
                    _, _, state = model.segment(rtg[:, start:start + K], obs[:, start:start + K],
                                                actions[:, start:start + K], state)
                acts = actions[:, first:t + 1].clone()
                acts[:, -1] = ACTION_PAD
                aux = model.segment(rtg[:, first:t + 1], obs[:, first:t + 1], acts, state)[1][:, -1]
            assert torch.allclose(policy.aux_probs, aux.softmax(-1), atol=1e-5), (variant, t)
            policy.record_action(actions[:, t])
    batch = run_episodes(model, RaggedVectorEnv([K + 3, 2]), seeds=[0, 1], target_return=1.0, trace=True)
    assert [t.aux_probs.shape for t in batch.traces] == [(K + 3, 2), (2, 2)]
    assert np.allclose(batch.traces[0].aux_probs.sum(-1), 1.0, atol=1e-5)
    assert run_episodes(tiny_model(variant), RaggedVectorEnv([2]), seeds=[0], target_return=1.0,
                        trace=True).traces[0].aux_probs is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("variant", ["rate", "dt"])
def test_a_model_converted_to_another_dtype_plays_and_traces(variant, dtype):
    # as one would convert a model for inference (bfloat16 on a GPU): its inputs follow the weights' dtype
    lengths = [2 * K + 3, 5]
    reference = run_episodes(tiny_model(variant), RaggedVectorEnv(lengths), seeds=[3, 4], target_return=1.0,
                             trace=True)
    converted = run_episodes(tiny_model(variant).to(dtype), RaggedVectorEnv(lengths), seeds=[3, 4], target_return=1.0,
                             trace=True)
    assert converted.lengths.tolist() == lengths
    for ours, theirs in zip(converted.traces, reference.traces, strict=True):
        assert ours.probs.dtype == np.float32 and np.allclose(ours.probs.sum(-1), 1.0, atol=1e-2)
        if dtype == torch.float64:  # more precise than float32: the same play
            assert ours.actions.tolist() == theirs.actions.tolist()
            assert np.allclose(ours.logits, theirs.logits, atol=1e-4)
    image = tiny_model(variant, obs_kind="image", obs_shape=(3, 64, 64)).to(dtype)
    frames = torch.randint(0, 256, (1, 2 * K, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        logits = image(torch.ones(1, 2 * K), frames, torch.zeros(1, 2 * K, dtype=torch.long))[0]
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
