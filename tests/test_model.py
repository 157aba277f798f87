"""Behaviour of the memory transformer: shapes, causality, memory flow, gradients, determinism."""

import pytest
import torch

from rate_core.model import ACTION_PAD, MemoryState, MemoryTransformer, ModelConfig
from rate_core.paper import PAPER_TASKS, paper_config
from tests.tiny import ALL_VARIANTS, K, N, random_batch, sample_logits, tiny_config, tiny_model
from training.step import train_step

RECURRENT = [v for v in ALL_VARIANTS if v != "dt"]


def test_config_rejects_inconsistent_modes():
    with pytest.raises(ValueError, match="mode dt needs"):
        tiny_config("dt", num_mem_tokens=2)
    with pytest.raises(ValueError, match="mode rmt needs"):
        tiny_config("rmt", n_head_ca=2)
    with pytest.raises(ValueError, match="mode trxl needs"):
        tiny_config("trxl", mem_len=0)
    with pytest.raises(ValueError, match="mode rate needs"):
        tiny_config("rate", num_mem_tokens=0)
    with pytest.raises(ValueError, match="obs_shape"):
        tiny_config("rate", obs_kind="image", obs_shape=(64, 64))
    with pytest.raises(ValueError, match="mrv_act"):
        tiny_config("rate", mrv_act="gelu")


@pytest.mark.parametrize("field, value, message", [
    ("dropout", 1.5, "dropout is a probability"), ("dropatt", -0.1, "dropatt is a probability"),
    ("d_inner", 0, "use_ffn needs d_inner >= 1"), ("n_head", 2.5, "n_head must be a whole number"),
    ("d_model", "64", "d_model must be a whole number"), ("n_layer", 4.0, "n_layer must be a whole number"),
    ("use_ffn", 1, "use_ffn must be true or false"), ("obs_shape", 5, "obs_shape must be a sequence"),
    ("d_model", 15, "d_model must be even"),
])
def test_config_names_the_field_of_a_value_of_the_wrong_type_or_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("rate", **{field: value})


def test_config_takes_numpy_numbers_as_plain_ones():
    import json
    from dataclasses import asdict

    import numpy as np

    config = tiny_config("rate", act_dim=np.int64(4), obs_shape=np.array([4]), dropout=np.float32(0.25),
                         use_ffn=np.bool_(True))  # e.g. from a gym env's spaces
    assert type(config.act_dim) is int and config.obs_shape == (4,) and type(config.dropout) is float
    assert config.use_ffn is True and json.loads(json.dumps(asdict(config)))["act_dim"] == 4


def test_image_configs_need_three_convolutions_and_room_for_them():
    with pytest.raises(ValueError, match="conv_channels: three channel counts"):
        tiny_config("rate", obs_kind="image", obs_shape=(3, 64, 64), conv_channels=(8, 8))
    with pytest.raises(ValueError, match="H and W >= 36"):
        tiny_config("rate", obs_kind="image", obs_shape=(3, 35, 64))
    tiny_config("rate", obs_kind="image", obs_shape=(3, 36, 36))  # the smallest that the encoder takes


def test_inputs_in_another_layout_are_refused_saying_what_was_expected():
    model = tiny_model("rate", obs_kind="image", obs_shape=(3, 36, 40))
    rtg, obs, actions = random_batch(model.config, batch=2, steps=K)
    assert obs.dtype == torch.uint8
    model(rtg, obs, actions)
    with pytest.raises(ValueError, match=r"obs must be \(B, T, \*obs_shape\) = \(2, 4, 3, 36, 40\).*channels first"):
        model(rtg, obs.permute(0, 1, 3, 4, 2), actions)  # frames (H, W, 3), as envs render them
    with pytest.raises(ValueError, match="image observations must be uint8"):
        model(rtg, obs.float() / 255, actions)  # scaled already: the model would scale them again
    with pytest.raises(ValueError, match=r"rtg must be \(B, T\) or \(B, T, 1\)"):
        model(rtg.reshape(2, K // 2, 2), obs, actions)
    vector = tiny_model("rate")
    rtg, obs, actions = random_batch(vector.config, batch=2, steps=K)
    with pytest.raises(ValueError, match=r"obs must be \(B, T, \*obs_shape\) = \(2, 4, 4\)"):
        vector(rtg, obs.transpose(0, 1), actions)  # time first



def test_actions_without_a_token_and_states_of_another_model_are_refused():
    model = tiny_model("rate_cached")  # memory tokens and a cache
    rtg, obs, actions = random_batch(model.config, batch=2, steps=K)
    _, state = model(rtg, obs, actions)
    for bad in (model.config.act_dim, model.config.act_dim + 3):  # act_dim itself would be read as padding
        with pytest.raises(ValueError, match=rf"actions must be from 0 to 3 \(negative: padding\), got {bad}"):
            model(rtg, obs, actions.clone().index_fill_(1, torch.tensor([1]), bad))
    model(rtg, obs, actions.clone().index_fill_(1, torch.tensor([1]), ACTION_PAD))  # padding: fine
    other = tiny_model("rate_cached", num_mem_tokens=model.config.num_mem_tokens + 2)
    _, foreign = other(rtg, obs, actions)
    with pytest.raises(ValueError, match=r"state.memory must be \(B, num_mem_tokens, d_model\).*another model"):
        model(rtg, obs, actions, foreign)
    with pytest.raises(ValueError, match=r"state.memory must be"):
        model.begin_segment(foreign)  # incremental inference checks it too
    with pytest.raises(ValueError, match=r"the state's batch does not match: \[2, 3\] rows \(the inputs have 3\)"):
        model(*random_batch(model.config, batch=3, steps=K), state)
    wide = MemoryState(state.memory, tuple(torch.cat([c, c], dim=-1) for c in state.cache))
    with pytest.raises(ValueError, match=r"state.cache tensors must be \(B, L, d_model\)"):
        model(rtg, obs, actions, wide)
    with pytest.raises(ValueError, match=r"state.cache must hold one tensor per layer \(2\), got 1"):
        model(rtg, obs, actions, MemoryState(state.memory, state.cache[:1]))
    dt = tiny_model("dt")
    with pytest.raises(ValueError, match=r"no memory tokens \(num_mem_tokens=0\)"):
        dt(rtg, obs, actions, state)
    with pytest.raises(ValueError, match="state must be a MemoryState"):
        model(rtg, obs, actions, (state.memory, state.cache))

def test_attention_mask_follows_the_spec():
    model = tiny_model("rate_cached")
    m, seg, cache = 3, 6, 5
    allowed = model.attention_mask(seg, cache)
    assert allowed.shape == (2 * m + seg, cache + 2 * m + seg)
    read_rows, seg_rows, write_rows = allowed[:m], allowed[m:m + seg], allowed[m + seg:]
    # read rows: the read block only
    assert read_rows[:, cache:cache + m].all() and read_rows.sum() == m * m
    # segment rows: all of the cache and read block, causal among segment tokens, never the write block
    assert seg_rows[:, :cache + m].all()
    assert torch.equal(seg_rows[:, cache + m:cache + m + seg], torch.ones(seg, seg, dtype=torch.bool).tril())
    assert not seg_rows[:, cache + m + seg:].any()
    # write rows: no cache, everything else
    assert not write_rows[:, :cache].any() and write_rows[:, cache:].all()


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_output_shapes_and_state(variant):
    model = tiny_model(variant)
    rtg, obs, actions = random_batch(model.config, batch=3, steps=model.config.segment_steps)
    logits, state = model(rtg, obs, actions)
    assert logits.shape == (3, model.config.segment_steps, 4)
    m = model.config.num_mem_tokens
    assert (state.memory is None) == (m == 0)
    if m:
        assert state.memory.shape == (3, m, 16)
    if model.config.mem_len:
        assert len(state.cache) == 2
        assert state.cache[0].shape == (3, min(model.config.mem_len, 2 * m + 3 * K), 16)
        assert not state.cache[0].requires_grad
    else:
        assert state.cache is None


@pytest.mark.parametrize("obs_shape", [(3, 64, 112), (3, 84, 84), (3, 64, 64)])
def test_image_encoder_accepts_task_image_sizes(obs_shape):
    model = tiny_model("rate", obs_kind="image", obs_shape=obs_shape)
    rtg, obs, actions = random_batch(model.config, batch=2, steps=K)
    assert obs.dtype == torch.uint8
    logits, state = model(rtg, obs, actions)
    assert logits.shape == (2, K, 4) and state.memory.shape == (2, 3, 16)


def test_paper_configs_build_for_all_tasks():
    for task in PAPER_TASKS:
        for mode in ("rate", "rmt", "trxl", "dt"):
            config = paper_config(task, mode)
            assert config.mode == mode
    assert paper_config("tmaze", "dt").segment_steps == 150


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_causality_within_and_across_segments(variant):
    """Perturbing R, o or a at step t leaves every earlier step's logits unchanged; a_t also leaves
    step t unchanged (it is predicted there), while o_t changes it."""
    model = tiny_model(variant)
    rtg, obs, actions = random_batch(model.config)
    with torch.no_grad():
        base = sample_logits(model, rtg, obs, actions)
        for t in range(K * N):
            for which in ("rtg", "obs", "actions"):
                r, o, a = rtg.clone(), obs.clone(), actions.clone()
                if which == "rtg":
                    r[:, t] += 5.0
                elif which == "obs":
                    o[:, t] += 3.0
                else:
                    a[:, t] = (a[:, t] + 1) % 4
                out = sample_logits(model, r, o, a)
                seen_up_to = t + 1 if which == "actions" else t
                assert torch.equal(out[:, :seen_up_to], base[:, :seen_up_to]), (which, t)
                if which == "obs":
                    assert not torch.allclose(out[:, t], base[:, t]), f"o_{t} must affect its own logits"


@pytest.mark.parametrize("variant", ["rate", "rate_cached", "rmt"])
def test_write_copy_never_influences_same_segment_logits(variant):
    model = tiny_model(variant)
    rtg, obs, actions = random_batch(model.config, steps=K)
    m = model.config.num_mem_tokens
    with torch.no_grad():
        # A cache from a previous segment, so cached configurations are covered too.
        _, state = model(rtg, obs, actions)
        tokens = model.embed(rtg, obs, actions)
        hidden, _ = model.run_core(tokens, state.memory, state.memory, state.cache)
        perturbed, _ = model.run_core(tokens, state.memory, state.memory + 10 * torch.randn_like(state.memory),
                                      state.cache)
    assert torch.equal(hidden[:, : m + 3 * K], perturbed[:, : m + 3 * K])
    assert not torch.allclose(hidden[:, m + 3 * K:], perturbed[:, m + 3 * K:])


def _second_segment_logits(model, obs_shift):
    rtg, obs, actions = random_batch(model.config, steps=2 * K)
    obs = obs.clone()
    obs[:, :K] += obs_shift
    with torch.no_grad():
        _, state = model(rtg[:, :K], obs[:, :K], actions[:, :K])
        logits, _ = model(rtg[:, K:], obs[:, K:], actions[:, K:], state)
    return logits


def test_information_crosses_segments_only_through_memory_tokens():
    """mem_len = 0: segment n's observations reach segment n+1 with memory tokens, not without."""
    with_memory = tiny_model("rate")
    assert not torch.allclose(_second_segment_logits(with_memory, 0.0), _second_segment_logits(with_memory, 2.0))
    rmt = tiny_model("rmt")
    assert not torch.allclose(_second_segment_logits(rmt, 0.0), _second_segment_logits(rmt, 2.0))
    # m = 0 and mem_len = 0: the same network run segment by segment carries nothing over.
    no_memory = tiny_model("dt")
    assert torch.equal(_second_segment_logits(no_memory, 0.0), _second_segment_logits(no_memory, 2.0))
    # The Transformer-XL cache is the other channel.
    trxl = tiny_model("trxl")
    assert not torch.allclose(_second_segment_logits(trxl, 0.0), _second_segment_logits(trxl, 2.0))


class RecordingOptimizer(torch.optim.SGD):
    """SGD that records the gradients it sees at every step."""

    def __init__(self, model):
        super().__init__(model.parameters(), lr=0.0)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.seen = []

    def step(self, closure=None):
        self.seen.append({self.names[id(p)]: (None if p.grad is None else p.grad.abs().sum().item())
                          for group in self.param_groups for p in group["params"]})
        return super().step(closure)


def _last_segment_only_batch(config):
    rtg, obs, actions = random_batch(config, batch=4)
    actions = actions.clone()
    actions[:, : (N - 1) * K] = ACTION_PAD  # no targets before the last segment
    return rtg, obs, actions


MRV_PARAMS = ("mrv.in_proj_weight", "mrv.out_proj.weight", "mrv_proj.weight")


def test_bptt_trains_memory_from_a_last_segment_loss():
    model = tiny_model("rate").train()
    optimizer = RecordingOptimizer(model)
    losses = train_step(model, optimizer, *_last_segment_only_batch(model.config), memory_grad="bptt")
    assert len(losses) == 1 and len(optimizer.seen) == 1
    grads = optimizer.seen[0]
    for name in MRV_PARAMS + ("initial_memory",):
        assert grads[name] is not None and grads[name] > 0, name


def test_bptt_gradient_reaches_the_write_path():
    """The write copy of segment 0 gets a gradient from a loss on segment 1 (through the MRV)."""
    model = tiny_model("rate")
    rtg, obs, actions = random_batch(model.config, steps=2 * K)
    m = model.config.num_mem_tokens
    memory = model.initial_state(2).memory
    write_copy = memory.detach().clone().requires_grad_()
    hidden, _ = model.run_core(model.embed(rtg[:, :K], obs[:, :K], actions[:, :K]), memory, write_copy)
    next_state = MemoryState(model.update_memory(memory, hidden[:, m + 3 * K:]), None)
    logits, _ = model(rtg[:, K:], obs[:, K:], actions[:, K:], next_state)
    logits.sum().backward()
    assert write_copy.grad is not None and write_copy.grad.abs().sum() > 0


def test_detached_mode_leaves_the_mrv_untrained():
    model = tiny_model("rate").train()
    optimizer = RecordingOptimizer(model)
    train_step(model, optimizer, *_last_segment_only_batch(model.config), memory_grad="detached")
    assert len(optimizer.seen) == 1  # one optimiser step per segment that has targets
    grads = optimizer.seen[0]
    for name in MRV_PARAMS + ("initial_memory",):
        assert not grads[name], name  # None or exactly zero
    assert grads["head.weight"] > 0


def test_the_schedule_keeps_pace_where_a_segment_has_nothing_to_learn():
    """Detached: one update per segment with targets, but the learning-rate schedule steps for every
    segment, as the trainer counts them, so that it ends where planned."""
    model = tiny_model("rate").train()
    optimizer = RecordingOptimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_step(model, optimizer, *_last_segment_only_batch(model.config), memory_grad="detached", scheduler=scheduler)
    assert len(optimizer.seen) == 1 and scheduler.last_epoch == N


def test_detached_mode_steps_once_per_segment():
    model = tiny_model("rate").train()
    optimizer = RecordingOptimizer(model)
    losses = train_step(model, optimizer, *random_batch(model.config), memory_grad="detached")
    assert len(losses) == N and len(optimizer.seen) == N


def test_dt_trains_on_one_window():
    model = tiny_model("dt").train()
    optimizer = RecordingOptimizer(model)
    losses = train_step(model, optimizer, *random_batch(model.config))
    assert len(losses) == 1 and len(optimizer.seen) == 1


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_eval_mode_is_deterministic(variant):
    model = tiny_model(variant, dropout=0.5, dropatt=0.5)
    batch = random_batch(model.config)
    with torch.no_grad():
        assert torch.equal(sample_logits(model, *batch), sample_logits(model, *batch))
        model.train()
        assert not torch.equal(sample_logits(model, *batch), sample_logits(model, *batch))


def test_mrv_is_deterministic_in_eval():
    model = tiny_model("rate", dropatt=0.9)
    memory = model.initial_state(2).memory
    write_out = torch.randn(2, 3, 16)
    with torch.no_grad():
        assert torch.equal(model.update_memory(memory, write_out), model.update_memory(memory, write_out))


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        model = tiny_model("rate_cached").train()
        model.activation_checkpointing = recompute
        torch.manual_seed(3)  # same dropout masks in both runs
        rtg, obs, actions = random_batch(model.config)
        sample_logits(model, rtg, obs, actions).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_model_config_round_trips_through_dict():
    config = tiny_config("rate", obs_kind="image", obs_shape=[3, 64, 64])
    assert config.obs_shape == (3, 64, 64)
    from dataclasses import asdict
    assert ModelConfig(**asdict(config)) == config
    assert MemoryTransformer(asdict(config)).config == config


@pytest.mark.parametrize("memory_grad", ["bptt", "detached"])
def test_micro_batches_give_the_same_update_as_the_whole_batch(memory_grad):
    rtg, obs, actions = random_batch(tiny_config("rate"), batch=6)
    actions[:2, :K] = ACTION_PAD  # uneven targets per micro-batch must still weigh as in the whole batch
    results = []
    for micro_batch in (None, 2):
        model = tiny_model("rate", dropout=0.0, dropatt=0.0).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = train_step(model, optimizer, rtg, obs, actions, memory_grad=memory_grad, micro_batch=micro_batch)
        results.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_train_step_refuses_a_micro_batch_below_one_and_targets_of_another_shape():
    rtg, obs, actions = random_batch(tiny_config("rate"), batch=2)
    model = tiny_model("rate").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="micro_batch must be at least 1"):
        train_step(model, optimizer, rtg, obs, actions, micro_batch=-1)
    with pytest.raises(ValueError, match=r"targets must have the actions' shape \(2, 12\).*got \(2, 4\)"):
        train_step(model, optimizer, rtg, obs, actions, targets=actions[:, :K])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"targets must be from 0 to 3 \(-10: padding\), got 4"):
        train_step(model, optimizer, rtg, obs, actions, targets=actions.clone().fill_(4))  # checked once per batch
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # before any update

@pytest.mark.parametrize("memory_grad", ["bptt", "detached"])
def test_step_weights_give_a_weighted_mean_loss(memory_grad):
    rtg, obs, actions = random_batch(tiny_config("rate"), batch=4)
    targets = (actions + 1) % 4
    zeroed = torch.zeros_like(actions, dtype=torch.bool)
    zeroed[1:, 2:7] = True
    weights = torch.where(zeroed, 0.0, 2.5)  # a constant weight is the plain mean; weight 0 is no target

    def trained(targets, weights, micro_batch=None):
        model = tiny_model("rate", dropout=0.0, dropatt=0.0).train()
        losses = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), rtg, obs, actions, targets=targets,
                            memory_grad=memory_grad, micro_batch=micro_batch, weights=weights)
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = trained(torch.where(zeroed, ACTION_PAD, targets), None)
    for micro_batch in (None, 2):
        weighted = trained(targets, weights, micro_batch)
        assert weighted[0] == pytest.approx(plain[0], abs=1e-6)
        assert torch.allclose(weighted[1], plain[1], atol=1e-6)
    tilted = trained(targets, torch.where(zeroed, 3.0, 1.0))
    assert not torch.allclose(tilted[1], plain[1], atol=1e-4)


def test_image_encoder_encodes_repeated_images_once_with_equal_outputs_and_gradients():
    from rate_core.model import ImageEncoder, _distinct_images

    torch.manual_seed(0)
    encoder = ImageEncoder((3, 84, 84), 16, (4, 8, 8))
    distinct = torch.randint(0, 256, (5, 3, 84, 84), dtype=torch.uint8)
    images = distinct[torch.tensor([0, 1, 0, 2, 3, 1, 4, 0] * 8)]  # 64 images, 5 distinct
    first, inverse = _distinct_images(images)
    assert first.numel() == 5 and torch.equal(images[first][inverse], images)
    outputs = encoder(images)
    outputs.square().sum().backward()
    grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    reference = encoder._encode(images)  # every image through the convolutions
    reference.square().sum().backward()
    assert torch.allclose(outputs, reference, atol=1e-6)
    for grad, parameter in zip(grads, encoder.parameters(), strict=True):
        assert torch.allclose(grad, parameter.grad, atol=1e-5, rtol=1e-4)
    # all distinct (or a small batch): the plain path
    assert _distinct_images(torch.randint(0, 256, (64, 3, 84, 84), dtype=torch.uint8)) is None


@pytest.mark.parametrize("variant", ["rate_cached", "dt"])
def test_without_action_inputs_the_actions_taken_change_nothing(variant):
    model = tiny_model(variant, action_inputs=False)
    rtg, obs, actions = random_batch(model.config)
    other = (actions + 1) % model.config.act_dim
    with torch.no_grad():
        first, _ = model(rtg, obs, actions)
        second, _ = model(rtg, obs, other)
    torch.testing.assert_close(first, second)
    with torch.no_grad():  # with them (the default), they do
        model = tiny_model(variant)
        assert not torch.allclose(model(rtg, obs, actions)[0], model(rtg, obs, other)[0])


@pytest.mark.parametrize("variant", ["rate", "dt"])
def test_auxiliary_head_reads_the_step_outputs_and_leaves_acting_unchanged(variant, tmp_path):
    from rate_core.checkpoint import load_checkpoint, save_checkpoint

    plain, with_aux = tiny_model(variant), tiny_model(variant, aux_classes=3)
    assert plain.aux_head is None and with_aux.aux_head.out_features == 3
    rtg, obs, actions = random_batch(with_aux.config, steps=K)
    logits, aux, state = with_aux.segment(rtg, obs, actions)
    assert aux.shape == (2, K, 3)
    same_logits, same_state = with_aux(rtg, obs, actions)
    assert torch.equal(logits, same_logits)
    assert (state.memory is None and same_state.memory is None) or torch.equal(state.memory, same_state.memory)
    # the head is a linear layer on the outputs the action head reads: the action logits do not depend on it
    with torch.no_grad():
        with_aux.aux_head.weight.add_(1.0)
    assert torch.equal(with_aux(rtg, obs, actions)[0], logits)
    # everything but the extra head is the plain model's (same seed, the head is made last)
    others = with_aux.state_dict()
    for name, a in plain.state_dict().items():
        assert torch.equal(a, others[name]), name
    assert plain.segment(rtg, obs, actions)[1] is None
    loaded = load_checkpoint(save_checkpoint(with_aux, tmp_path / "aux"))
    assert loaded.config.aux_classes == 3
    assert torch.equal(loaded.segment(rtg, obs, actions)[1], with_aux.segment(rtg, obs, actions)[1])
    with pytest.raises(ValueError, match="aux_classes must be >= 0"):
        tiny_config(variant, aux_classes=-1)


def test_the_mask_cache_serves_threads_that_share_the_model_while_one_clears_it():
    import sys
    import threading

    model = tiny_model("dt", context_length=50, sections=3)  # a DT episode passes 64 window shapes: the cache clears
    errors = []

    def play(offset):
        try:
            for _ in range(60):
                for n in range(1, 151):
                    assert model.attention_mask(3 * ((n + offset) % 150 + 1), 0) is not None
        except Exception as error:  # noqa: BLE001 - any error of a thread is the finding
            errors.append(repr(error))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that a clear falls between a look-up and a read
    try:
        threads = [threading.Thread(target=play, args=(offset,)) for offset in (0, 75)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
