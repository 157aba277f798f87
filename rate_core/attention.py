"""Transformer-XL relative attention, computed in cache-sized chunks.

For every (batch, head) row the scores are

    S = scale * ((q + u) k^T + shift((q + v) r^T)),   masked where the key is not allowed,

followed by softmax, dropout and the weighted sum of values. The (Q x K) matrices of a row are the
bulk of the work and of the memory. On a CPU, streaming them through main memory op by op is what
makes attention slow, so `relative_attention` works on a few rows at a time (sized to stay in
cache) and keeps nothing of size Q x K for backward: the backward pass recomputes each chunk's
probabilities (as flash attention does). Dropout masks are regenerated from a per-call seed, so
the recomputation is exact. Where that skips enough of the scores to pay, the query rows go in
blocks (`attention_blocks`) that compute only the keys their mask lets them see: a causal window
(DT) skips the keys after each block of rows, a RATE segment's memory tokens the Transformer-XL
cache. A block that sees all of its keys is not masked.
"""

import math

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 28}  # Q x K elements per chunk: 8 MB stays in a CPU cache (L3)


def sinusoid(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """(P,) signed relative distances -> (P, dim) sinusoidal embedding (Transformer-XL)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) / dim))
    angles = distances.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def shifted_view(position_scores: torch.Tensor, q_len: int, key_len: int) -> torch.Tensor:
    """View of (c, Q, W + 1) position scores, column w holding distance key_len - 1 - w for w < W and
    a spare last column, as (c, Q, key_len): entry (i, j) holds distance (key_len - Q + i) - j.

    Entries whose distance has no column (below key_len - W) read neighbouring values; the mask hides
    them. The spare column keeps the rows of the view from overlapping, so it can also be written.
    """
    rows, _, width1 = position_scores.shape
    assert key_len <= width1 - 1, "need a column for every distance from key_len - 1 down to 0"
    return position_scores.as_strided((rows, q_len, key_len), (q_len * width1, width1 - 1, 1),
                                      position_scores.storage_offset() + q_len - 1)


def _chunk_probabilities(content_query, position_query, key, position_key, blocked, scale):
    """Softmax probabilities (c, Q, K) of one block of one chunk. position_key: (c, W + 1, dh), last
    row zero; blocked: (Q, K) bool, True where the key is hidden, or None where none is."""
    q_len, key_len = content_query.shape[1], key.shape[1]
    position_scores = torch.bmm(position_query, position_key.transpose(1, 2))
    scores = torch.baddbmm(shifted_view(position_scores, q_len, key_len), content_query, key.transpose(1, 2),
                           beta=scale, alpha=scale)
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))
    return scores.softmax(dim=-1)


def _keep_mask(shape, dropout, seed, device):
    """Bool dropout keep-mask, reproducible from seed, and the 1 / P(keep) rescaling factor.

    CPU random number generation costs more than the rest of a chunk's attention, so the mask is
    cut from 64-bit random words: three uniform 16-bit lanes per word (the generator's words are
    uniform in [0, 2^63), so the top lane is not used). P(drop) is `dropout` rounded to 1/65536.
    """
    count = math.prod(shape)
    generator = torch.Generator(device=device).manual_seed(seed)
    words = torch.empty((count + 2) // 3, dtype=torch.int64, device=device).random_(generator=generator)
    lanes = words.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:count]
    dropped = round(dropout * 65536)
    return (lanes >= dropped - 32768).view(shape), 65536 / (65536 - dropped)


class _RelativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, content_bias, position_bias, position_key, allowed, scale, dropout, seed,
                chunk, blocks):
        # The inputs come in one dtype (relative_attention casts them); autocast must not re-cast parts
        # of the kernel (on CUDA it runs softmax in float32, and bmm's out= would then mismatch).
        with torch.autocast(query.device.type, enabled=False):
            return _RelativeAttention._forward(ctx, query, key, value, content_bias, position_bias, position_key,
                                               allowed, scale, dropout, seed, chunk, blocks)

    @staticmethod
    def _forward(ctx, query, key, value, content_bias, position_bias, position_key, allowed, scale, dropout, seed,
                 chunk, blocks):
        rows, n_head = query.shape[0], position_key.shape[0]
        padded_key = F.pad(position_key, (0, 0, 0, 1))  # spare zero row -> spare column of the scores
        blocked = ~allowed
        out = query.new_empty(rows, query.shape[1], value.shape[2])
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            heads = torch.arange(part.start, part.stop, device=key.device) % n_head
            content_query = query[part] + content_bias[heads, None]
            position_query = query[part] + position_bias[heads, None]
            chunk_pk = padded_key[heads]
            for index, (q_start, q_end, key_start, key_end, dense) in enumerate(blocks):
                queries, keys = slice(q_start, q_end), slice(key_start, key_end)
                probs = _chunk_probabilities(content_query[:, queries], position_query[:, queries], key[part, keys],
                                             chunk_pk[:, _position_offset(allowed.shape[1], key_start, key_end):],
                                             None if dense else blocked[queries, keys], scale)
                target = out[part, queries]
                if dropout:
                    keep, rescale = _keep_mask(probs.shape, dropout, _block_seed(seed, start, index, blocks),
                                               probs.device)
                    torch.bmm(probs.mul_(keep), value[part, keys], out=target)
                    target.mul_(rescale)  # rescaling the (Q x dh) output is cheaper than the (Q x K) weights
                else:
                    torch.bmm(probs, value[part, keys], out=target)
        ctx.save_for_backward(query, key, value, content_bias, position_bias, padded_key, allowed)
        ctx.config = (scale, dropout, seed, chunk, blocks)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no second time
        with torch.autocast(grad_out.device.type, enabled=False):
            return _RelativeAttention._backward(saved, ctx.config, grad_out.to(saved[0].dtype))

    @staticmethod
    def _backward(saved, config, grad_out):
        query, key, value, content_bias, position_bias, padded_key, allowed = saved
        scale, dropout, seed, chunk, blocks = config
        rows, key_len = query.shape[0], allowed.shape[1]
        n_head = padded_key.shape[0]
        blocked = ~allowed
        grad_query = torch.empty_like(query)  # every query row belongs to one block
        grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)  # keys are shared by blocks
        grad_cb, grad_pb, grad_pk = (torch.zeros_like(t) for t in (content_bias, position_bias, padded_key))
        grad_out = grad_out.contiguous()
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            heads = torch.arange(part.start, part.stop, device=key.device) % n_head
            chunk_pk = padded_key[heads]
            content_query = query[part] + content_bias[heads, None]
            position_query = query[part] + position_bias[heads, None]
            for index, (q_start, q_end, key_start, key_end, dense) in enumerate(blocks):
                queries, keys = slice(q_start, q_end), slice(key_start, key_end)
                block_cq, block_pq = content_query[:, queries], position_query[:, queries]
                offset = _position_offset(key_len, key_start, key_end)
                block_pk = chunk_pk[:, offset:]
                probs = _chunk_probabilities(block_cq, block_pq, key[part, keys], block_pk,
                                             None if dense else blocked[queries, keys], scale)
                g = grad_out[part, queries]
                if dropout:
                    keep, rescale = _keep_mask(probs.shape, dropout, _block_seed(seed, start, index, blocks),
                                               probs.device)
                    g = g * rescale
                    grad_probs = torch.bmm(g, value[part, keys].transpose(1, 2)).mul_(keep)
                    grad_value[part, keys].baddbmm_((probs * keep).transpose(1, 2), g)
                else:
                    grad_probs = torch.bmm(g, value[part, keys].transpose(1, 2))
                    grad_value[part, keys].baddbmm_(probs.transpose(1, 2), g)
                # softmax backward, one fused kernel: dS = P * (dP - sum(dP * P)); masked entries have P = 0.
                grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(scale)
                grad_cq = torch.bmm(grad_scores, key[part, keys])
                grad_key[part, keys].baddbmm_(grad_scores.transpose(1, 2), block_cq)
                grad_position = grad_scores.new_zeros(grad_scores.shape[0], q_end - q_start, block_pk.shape[1])
                shifted_view(grad_position, q_end - q_start, key_end - key_start).copy_(grad_scores)
                grad_pq = torch.bmm(grad_position, block_pk)
                grad_pk[:, offset:].index_add_(0, heads, torch.bmm(grad_position.transpose(1, 2), block_pq))
                torch.add(grad_cq, grad_pq, out=grad_query[part, queries])
                grad_cb.index_add_(0, heads, grad_cq.sum(1))
                grad_pb.index_add_(0, heads, grad_pq.sum(1))
        return (grad_query, grad_key, grad_value, grad_cb, grad_pb, grad_pk[:, :-1], None, None, None, None, None,
                None)


def _position_offset(key_len: int, key_start: int, key_end: int) -> int:
    """The first row of a position-key table (row w: distance key_len - 1 - w) that a block of keys
    [key_start, key_end) needs: from it on, row w holds distance (key_end - key_start) - 1 - w."""
    return key_len - (key_end - key_start)


def _block_seed(seed: int, start: int, index: int, blocks: list) -> int:
    """The dropout seed of one block of one chunk of rows: distinct for every (chunk, block)."""
    return seed + start * len(blocks) + index


def relative_attention(query, key, value, content_bias, position_bias, position_key, allowed, scale,
                       dropout=0.0, chunk=None, skip_hidden=True):
    """Relative multi-head attention over (batch x head) rows, row r belonging to head r % H.

    query: (R, Q, dh); key, value: (R, K, dh); content_bias, position_bias: (H, dh), added to the
    query for the content and the position term; position_key: (H, W, dh), row w for distance
    K - 1 - w (W >= K); allowed: (Q, K) bool, query i sits at key position K - Q + i; dropout on
    the attention probabilities; chunk: rows per pass (default: sized to the cache); skip_hidden:
    on a device type in BLOCK_DEVICES (CPUs), compute each block of query rows over only the keys
    it may see (`attention_blocks`; False: every row over every key, as a plain chunked kernel, for
    comparison). Returns (R, Q, dh).
    """
    q_len, key_len = allowed.shape
    if chunk is None:
        budget = CHUNK_ELEMENTS.get(query.device.type, CHUNK_ELEMENTS["cpu"])
        # sized by the whole Q x K: chunks sized by the blocks (more rows each) measured slower
        chunk = max(1, budget // (q_len * key_len))
    use_blocks = skip_hidden and query.device.type in BLOCK_DEVICES
    blocks = attention_blocks(allowed) if use_blocks else one_block(allowed)
    seed = int(torch.randint(0, 2**62, (1,))) if dropout else 0
    # Keys and values may be views into preallocated buffers: only their rows must be contiguous.
    key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value))
    # Under autocast the projections come in a lower precision than the (float32) biases: the kernel
    # works in one dtype, the query's (the casts carry the gradients back).
    dtype = query.dtype
    key, value, content_bias, position_bias, position_key = (
        t.to(dtype) for t in (key, value, content_bias, position_bias, position_key))
    return _RelativeAttention.apply(query.contiguous(), key, value, content_bias,
                                    position_bias, position_key.contiguous(), allowed, scale, dropout, seed, chunk,
                                    blocks)


# Device types whose training kernel runs in blocks: measured on CPUs (training.bench_attention);
# elsewhere (CUDA) the kernel runs as one block, every row over every key.
BLOCK_DEVICES = ("cpu",)
INFERENCE_ELEMENTS = 1 << 23  # Q x K score elements per pass of the inference kernel (32 MB in float32)
QUERY_BLOCK = 64  # long causal query runs are cut into blocks that skip the keys their mask hides
# Blocks are used when they compute at most this share of the Q x K scores. Measured on 2 cores
# (training.bench_attention): causal windows (about 0.6) ran 1.4-2.3x faster in blocks; RATE
# segments (0.7-0.85) gained on one thread but lost up to 1.3x on two.
SKIP_BELOW = 2 / 3


def one_block(allowed: torch.Tensor, dense: bool = False) -> list[tuple[int, int, int, int, bool]]:
    """The plan of attention_blocks that computes every query row over every key."""
    q_len, key_len = allowed.shape
    return [(0, q_len, 0, key_len, dense)]


def scores_computed(blocks: list[tuple[int, int, int, int, bool]]) -> int:
    """How many of the Q x K scores a plan of attention_blocks computes."""
    return sum((q_end - q_start) * (key_end - key_start) for q_start, q_end, key_start, key_end, _ in blocks)


def attention_blocks(allowed: torch.Tensor) -> list[tuple[int, int, int, int, bool]]:
    """[(q_start, q_end, key_start, key_end, dense)]: the query rows in blocks, each with the only
    keys its rows may see and whether it sees all of them (then no mask is applied).

    Query i sits at key position K - Q + i, so a block [s, e) ends its keys at K - Q + e (the
    kernels' shifted position scores need that alignment) when none of its rows sees a later key;
    a block grows until that holds. Rows are grouped by the first key they see and by their kind
    (causal: seeing up to their own position; otherwise the last key they see): the read memory
    tokens, the segment and the write memory tokens of a RATE segment are blocks of their own, and
    long causal runs (DT's windows) are cut into blocks of QUERY_BLOCK rows. Where the blocks would
    compute more than SKIP_BELOW of the scores, all rows are one block. Plans are kept on the mask
    (the model reuses its masks)."""
    cached = getattr(allowed, "_attention_blocks", None)
    if cached is not None and cached[0] == (QUERY_BLOCK, SKIP_BELOW, allowed._version):
        return cached[1]
    q_len, key_len = allowed.shape
    offset = key_len - q_len
    columns = torch.arange(key_len, device=allowed.device)
    sees = allowed.any(1)  # a row that sees nothing spans all keys (its softmax is undefined anyway)
    first = torch.where(sees, torch.where(allowed, columns, key_len).amin(1), 0).tolist()
    last = torch.where(sees, torch.where(allowed, columns + 1, 0).amax(1), key_len).tolist()
    kind = [(first[i], None if last[i] == offset + i + 1 else last[i]) for i in range(q_len)]
    blocks, start = [], 0
    while start < q_len:
        end = start + 1
        while end < q_len and kind[end] == kind[start]:
            end += 1
        if kind[start][1] is None and end - start >= 2 * QUERY_BLOCK:
            end = start + QUERY_BLOCK
        while max(last[start:end]) > offset + end:
            end += 1
        key_start, key_end = min(first[start:end]), offset + end
        dense = bool(allowed[start:end, key_start:key_end].all())
        blocks.append((start, end, key_start, key_end, dense))
        start = end
    if scores_computed(blocks) > SKIP_BELOW * q_len * key_len:  # too little skipped to pay for smaller products
        blocks = one_block(allowed, dense=bool(allowed.all()))
    allowed._attention_blocks = ((QUERY_BLOCK, SKIP_BELOW, allowed._version), blocks)
    return blocks


@torch.no_grad()
def relative_attention_inference(query, key, value, content_bias, position_bias, position_key, allowed, scale,
                                 need_weights=False):
    """relative_attention without autograd or dropout, for rollouts.

    Incremental inference attends from a few new queries to many keys. There the per-row gather
    of position keys and the many small products of the training kernel cost more than the
    arithmetic, so the position scores of all rows of a head come from one matrix product. Rows
    are processed in groups of whole batch entries to bound memory for long windows (DT), and
    long causal query runs in blocks that skip the keys they cannot see.
    Same arguments as relative_attention; returns the output (R, Q, dh) and, with need_weights,
    the attention probabilities (R, Q, K) (else None).
    """
    # Under autocast (held-out losses of a bf16 run) the projections come in a lower precision than
    # the biases and cached keys: work in the query's dtype, autocast off (it would re-cast parts).
    with torch.autocast(query.device.type, enabled=False):
        dtype = query.dtype
        key, value, content_bias, position_bias, position_key = (
            t.to(dtype) for t in (key, value, content_bias, position_bias, position_key))
        return _relative_attention_inference(query, key, value, content_bias, position_bias, position_key, allowed,
                                             scale, need_weights)


def _relative_attention_inference(query, key, value, content_bias, position_bias, position_key, allowed, scale,
                                  need_weights):
    rows, q_len, d_head = query.shape
    n_head, key_len = position_key.shape[0], allowed.shape[1]
    padded_key = F.pad(position_key, (0, 0, 0, 1)).transpose(1, 2)  # (H, dh, W + 1), spare zero column
    width1 = padded_key.shape[2]
    batch_per_group = max(1, INFERENCE_ELEMENTS // (n_head * q_len * (key_len + width1)))
    blocked = ~allowed
    out = query.new_empty(rows, q_len, value.shape[2])
    weights = query.new_zeros(rows, q_len, key_len) if need_weights else None
    # A few new queries (incremental inference) are one block: planning would cost more than it saves.
    blocks = attention_blocks(allowed) if q_len >= 2 * QUERY_BLOCK else one_block(allowed)
    for start in range(0, rows, batch_per_group * n_head):
        part = slice(start, min(start + batch_per_group * n_head, rows))
        grouped = query[part].view(-1, n_head, q_len, d_head)  # (b, H, Q, dh)
        batch = grouped.shape[0]
        for q_start, q_end, key_start, key_end, dense in blocks:
            q_rows, keys = q_end - q_start, slice(key_start, key_end)
            block = grouped[:, :, q_start:q_end]
            content_query = (block + content_bias[:, None]).reshape(-1, q_rows, d_head)
            position_query = (block + position_bias[:, None]).transpose(0, 1).reshape(n_head, batch * q_rows, d_head)
            block_pk = padded_key[:, :, _position_offset(key_len, key_start, key_end):]  # (H, dh, block's W + 1)
            position_scores = torch.bmm(position_query, block_pk)
            position_scores = position_scores.view(n_head, batch, q_rows, -1).transpose(0, 1)
            position_scores = position_scores.reshape(batch * n_head, q_rows, -1)
            scores = torch.baddbmm(shifted_view(position_scores, q_rows, key_end - key_start), content_query,
                                   key[part, keys].transpose(1, 2), beta=scale, alpha=scale)
            if not dense:
                scores.masked_fill_(blocked[q_start:q_end, keys], float("-inf"))
            probs = scores.softmax(dim=-1)
            torch.bmm(probs, value[part, keys], out=out[part, q_start:q_end])
            if need_weights:
                weights[part, q_start:q_end, keys] = probs
    return out, weights
