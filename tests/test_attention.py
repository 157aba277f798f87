"""The chunked relative-attention kernel equals plain autograd attention, values and gradients."""

from itertools import pairwise

import pytest
import torch

from rate_core import attention
from rate_core.attention import relative_attention, shifted_view


def plain_attention(query, key, value, content_bias, position_bias, position_key, allowed, scale):
    """The textbook computation with direct indexing of distances, for comparison."""
    rows, q_len, _ = query.shape
    key_len = key.shape[1]
    n_head, width, _ = position_key.shape
    heads = torch.arange(rows) % n_head
    content_query, position_query = query + content_bias[heads, None], query + position_bias[heads, None]
    scores = content_query @ key.transpose(1, 2)
    position = torch.zeros(rows, q_len, key_len, dtype=scores.dtype)
    for i in range(q_len):
        for j in range(key_len):
            column = key_len - 1 - ((key_len - q_len + i) - j)
            if 0 <= column < width and allowed[i, j]:
                position[:, i, j] = (position_query[:, i] * position_key[heads, column]).sum(-1)
    scores = ((scores + position) * scale).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ value


def random_inputs(rows=6, q_len=5, key_len=8, extra=2, n_head=3, d_head=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True)  # noqa: E731
    allowed = torch.rand(q_len, key_len, generator=gen) < 0.7
    allowed[:, key_len - q_len:] |= torch.eye(q_len, dtype=torch.bool)  # every row sees something
    # forbid distances that have no position row, as the model's mask does
    for i in range(q_len):
        for j in range(key_len):
            if (key_len - q_len + i) - j < -extra:
                allowed[i, j] = False
    return (make(rows, q_len, d_head), make(rows, key_len, d_head), make(rows, key_len, d_head),
            make(n_head, d_head), make(n_head, d_head), make(n_head, key_len + extra, d_head), allowed)


def test_shifted_view_indexes_distances():
    q_len, key_len, width = 4, 6, 7
    scores = torch.randn(2, q_len, width + 1)
    view = shifted_view(scores, q_len, key_len)
    for i in range(q_len):
        for j in range(key_len):
            column = key_len - 1 - ((key_len - q_len + i) - j)
            if column <= width:
                assert torch.equal(view[:, i, j], scores[:, i, column])


def assert_matches_plain_attention(tensors, allowed, chunk) -> torch.Tensor:
    """relative_attention equals plain_attention, values and gradients; returns plain_attention's values."""
    ours = relative_attention(*tensors, allowed, scale=0.5, chunk=chunk)
    reference = plain_attention(*tensors, allowed, scale=0.5)
    assert torch.allclose(ours, reference, atol=1e-12)
    weights = torch.randn_like(ours)
    grads_ours = torch.autograd.grad((ours * weights).sum(), tensors)
    grads_ref = torch.autograd.grad((reference * weights).sum(), tensors)
    names = ("query", "key", "value", "content_bias", "position_bias", "position_key")
    for name, a, b in zip(names, grads_ours, grads_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-10), name
    return reference


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_matches_plain_attention_values_and_gradients(chunk):
    *tensors, allowed = random_inputs()
    assert_matches_plain_attention(tensors, allowed, chunk)


def test_mixed_precision_inputs_as_autocast_gives_them():
    # under autocast the projections are bfloat16 while the biases stay float32 parameters
    inputs = random_inputs()
    *tensors, allowed = inputs
    low = [t.detach().to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(tensors)]
    ours = relative_attention(*low, allowed, scale=0.5)
    reference = plain_attention(*tensors, allowed, scale=0.5)
    assert ours.dtype == torch.bfloat16
    assert torch.allclose(ours.double(), reference, atol=0.05)
    weights = torch.randn_like(reference)
    grads_ours = torch.autograd.grad((ours.double() * weights).sum(), low)
    grads_ref = torch.autograd.grad((reference * weights).sum(), tensors)
    for t, a, b in zip(low, grads_ours, grads_ref, strict=True):
        assert a.dtype == t.dtype
        assert torch.allclose(a.double(), b, atol=0.1, rtol=0.05)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device here"))]


@pytest.mark.parametrize("device", DEVICES)
def test_runs_inside_autocast(device):
    # autocast stays on around the kernel in training (on CUDA it would run softmax in float32)
    *tensors, allowed = random_inputs(dtype=torch.float32)
    tensors = [t.detach().to(device).requires_grad_() for t in tensors]
    with torch.autocast(device, dtype=torch.bfloat16):
        low = [t.to(torch.bfloat16) if i < 3 else t for i, t in enumerate(tensors)]
        ours = relative_attention(*low, allowed.to(device), scale=0.5, dropout=0.1)
    assert ours.dtype == torch.bfloat16
    ours.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_kernel_runs_inside_autocast(device):
    # held-out losses of a bf16 run: bfloat16 projections beside float32 biases, keys and values
    *tensors, allowed = random_inputs(dtype=torch.float32)
    tensors = [t.to(device) for t in tensors]
    expected, _ = attention.relative_attention_inference(*tensors, allowed.to(device), 0.5)
    with torch.autocast(device, dtype=torch.bfloat16):
        low = [t.to(torch.bfloat16) if i == 0 else t for i, t in enumerate(tensors)]
        ours, weights = attention.relative_attention_inference(*low, allowed.to(device), 0.5, need_weights=True)
    assert ours.dtype == weights.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), expected, atol=0.05)


def test_gradcheck_with_dropout():
    *tensors, allowed = random_inputs(rows=3, q_len=3, key_len=4, extra=1, n_head=3, d_head=2)
    torch.manual_seed(0)

    def fixed_seed_attention(*args):
        torch.manual_seed(7)  # the same dropout mask on every evaluation
        return relative_attention(*args, allowed, scale=0.7, dropout=0.3, chunk=2)

    assert torch.autograd.gradcheck(fixed_seed_attention, tuple(tensors))


def test_dropout_drops_and_rescales():
    *tensors, allowed = random_inputs(dtype=torch.float32)
    torch.manual_seed(1)
    a = relative_attention(*tensors, allowed, scale=0.5, dropout=0.5)
    torch.manual_seed(1)
    b = relative_attention(*tensors, allowed, scale=0.5, dropout=0.5)
    c = relative_attention(*tensors, allowed, scale=0.5)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("q_len,key_len,causal", [(3, 9, True), (150, 160, True), (150, 150, False)])
def test_inference_kernel_matches_plain_attention(q_len, key_len, causal, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)  # several query blocks, some cut short
    monkeypatch.setattr(attention, "INFERENCE_ELEMENTS", 3 * q_len * key_len * 4)  # several row groups
    gen = torch.Generator().manual_seed(0)
    rows, n_head, d_head = 12, 3, 4
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    query, key, value = make(rows, q_len, d_head), make(rows, key_len, d_head), make(rows, key_len, d_head)
    content_bias, position_bias = make(n_head, d_head), make(n_head, d_head)
    position_key = make(n_head, key_len + 2, d_head)
    offset = key_len - q_len
    positions = torch.arange(key_len)[None, :] <= torch.arange(q_len)[:, None] + offset
    allowed = positions if causal else torch.rand(q_len, key_len, generator=gen) < 0.5
    allowed[:, offset:] |= torch.eye(q_len, dtype=torch.bool)
    if not causal:  # rows that see later keys (as write tokens do) within the available distances
        allowed &= torch.arange(key_len)[None, :] <= torch.arange(q_len)[:, None] + offset + 2
    out, weights = attention.relative_attention_inference(query, key, value, content_bias, position_bias, position_key,
                                                          allowed, 0.5, need_weights=True)
    expected = plain_attention(query, key, value, content_bias, position_bias, position_key, allowed, 0.5)
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.allclose(weights.sum(-1), torch.ones(rows, q_len, dtype=torch.float64))
    assert torch.allclose(weights @ value, expected, atol=1e-12)


def model_mask(num_tokens: int, cache_len: int, memory_tokens: int) -> torch.Tensor:
    """The model's segment mask: read memory, the segment's causal tokens and write memory."""
    from tests.tiny import tiny_model

    model = tiny_model("rate_cached", num_mem_tokens=memory_tokens) if memory_tokens else tiny_model("dt")
    return model._build_mask(num_tokens, cache_len)


def test_blocks_of_a_rate_segment_skip_what_their_rows_cannot_see():
    m, segment, cache = 3, 6, 60
    allowed = model_mask(segment, cache, m)
    q_len, key_len = allowed.shape
    assert attention.attention_blocks(allowed) == [
        (0, m, cache, cache + m, True),                        # read memory: only itself
        (m, m + segment, 0, cache + m + segment, False),      # the segment: causal, not the write tokens
        (m + segment, q_len, cache, key_len, True),           # write memory: not the cache
    ]
    # blocks that would skip little (no cache yet) are not worth their smaller products: one block
    assert attention.attention_blocks(model_mask(12, 0, m)) == [(0, 18, 0, 18, False)]


@pytest.mark.parametrize("q_len,key_len,seed", [(150, 150, 0), (150, 160, 1), (40, 70, 2), (9, 9, 3)])
def test_blocks_cover_every_allowed_key(q_len, key_len, seed, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    monkeypatch.setattr(attention, "SKIP_BELOW", 1.0)  # blocks however little they skip
    gen = torch.Generator().manual_seed(seed)
    offset = key_len - q_len
    causal = torch.arange(key_len)[None, :] <= torch.arange(q_len)[:, None] + offset
    allowed = causal & (torch.rand(q_len, key_len, generator=gen) < 0.8) if seed else causal
    allowed[:, offset:] |= torch.eye(q_len, dtype=torch.bool)
    allowed[: q_len // 4, offset + q_len // 4:] = seed % 2 == 1  # rows that see later keys (as memory tokens do)
    blocks = attention.attention_blocks(allowed)
    assert blocks[0][0] == 0 and blocks[-1][1] == q_len
    assert all(a[1] == b[0] for a, b in pairwise(blocks))  # consecutive, no row left out
    for q_start, q_end, key_start, key_end, dense in blocks:
        assert key_end == offset + q_end  # the alignment of the shifted position scores
        outside = allowed[q_start:q_end].clone()
        outside[:, key_start:key_end] = False
        assert not outside.any()
        assert dense == bool(allowed[q_start:q_end, key_start:key_end].all())
    if seed == 0:  # a causal window is cut into blocks of QUERY_BLOCK rows that end at their last query
        assert [b[:2] for b in blocks][:3] == [(0, 16), (16, 32), (32, 48)]


def structured_inputs(allowed, rows=4, n_head=2, d_head=3, extra=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    q_len, key_len = allowed.shape
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True)  # noqa: E731
    return (make(rows, q_len, d_head), make(rows, key_len, d_head), make(rows, key_len, d_head),
            make(n_head, d_head), make(n_head, d_head), make(n_head, key_len + extra, d_head))


@pytest.mark.parametrize("shape", ["rate", "rate_first_segment", "dt"])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_blocked_kernel_matches_plain_attention_on_model_masks(shape, chunk, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    monkeypatch.setattr(attention, "SKIP_BELOW", 1.0)
    m = 0 if shape == "dt" else 3
    allowed = model_mask(30 if shape == "dt" else 12, 20 if shape == "rate" else 0, m)
    tensors = structured_inputs(allowed, extra=max(m - 1, 0))
    assert len(attention.attention_blocks(allowed)) >= 3
    reference = assert_matches_plain_attention(tensors, allowed, chunk)
    inference, _ = attention.relative_attention_inference(*(t.detach() for t in tensors), allowed, 0.5)
    assert torch.allclose(inference, reference, atol=1e-12)
    assert torch.allclose(relative_attention(*tensors, allowed, scale=0.5, chunk=chunk, skip_hidden=False), reference,
                          atol=1e-12)


def test_gradcheck_with_dropout_over_several_blocks(monkeypatch):
    monkeypatch.setattr(attention, "SKIP_BELOW", 1.0)
    allowed = model_mask(3, 2, 2)
    assert len(attention.attention_blocks(allowed)) == 3
    tensors = structured_inputs(allowed, rows=2, n_head=2, d_head=2, extra=1)

    def fixed_seed_attention(*args):
        torch.manual_seed(7)  # the same dropout mask on every evaluation
        return relative_attention(*args, allowed, scale=0.7, dropout=0.3, chunk=1)

    assert torch.autograd.gradcheck(fixed_seed_attention, tuple(tensors))
