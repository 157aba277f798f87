"""Transformer-XL relative attention, computed in cache-sized chunks.

For every (batch, head) row the scores are

    S = scale * ((q + u) k^T + shift((q + v) r^T)),   masked where the key is not allowed,

followed by softmax, dropout and the weighted sum of values. The (Q x K) matrices of a row are the
bulk of the work and of the memory. On a CPU, streaming them through main memory op by op is what
makes attention slow, so `relative_attention` works on a few rows at a time (sized to stay in
cache) and keeps nothing of size Q x K for backward: the backward pass recomputes each chunk's
probabilities (as flash attention does). Dropout masks are regenerated from a per-call seed, so
the recomputation is exact.
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


def _chunk_probabilities(content_query, position_query, key, position_key, allowed, scale):
    """Softmax probabilities (c, Q, K) of one chunk. position_key: (c, W + 1, dh), last row zero."""
    q_len, key_len = allowed.shape
    position_scores = torch.bmm(position_query, position_key.transpose(1, 2))
    scores = torch.baddbmm(shifted_view(position_scores, q_len, key_len), content_query, key.transpose(1, 2),
                           beta=scale, alpha=scale)
    return scores.masked_fill_(~allowed, float("-inf")).softmax(dim=-1)


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
                chunk):
        # The inputs come in one dtype (relative_attention casts them); autocast must not re-cast parts
        # of the kernel (on CUDA it runs softmax in float32, and bmm's out= would then mismatch).
        with torch.autocast(query.device.type, enabled=False):
            return _RelativeAttention._forward(ctx, query, key, value, content_bias, position_bias, position_key,
                                               allowed, scale, dropout, seed, chunk)

    @staticmethod
    def _forward(ctx, query, key, value, content_bias, position_bias, position_key, allowed, scale, dropout, seed,
                 chunk):
        rows, n_head = query.shape[0], position_key.shape[0]
        padded_key = F.pad(position_key, (0, 0, 0, 1))  # spare zero row -> spare column of the scores
        out = query.new_empty(rows, query.shape[1], value.shape[2])
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            heads = torch.arange(part.start, part.stop, device=key.device) % n_head
            probs = _chunk_probabilities(query[part] + content_bias[heads, None],
                                         query[part] + position_bias[heads, None],
                                         key[part], padded_key[heads], allowed, scale)
            if dropout:
                keep, rescale = _keep_mask(probs.shape, dropout, seed + start, probs.device)
                torch.bmm(probs.mul_(keep), value[part], out=out[part])
                out[part].mul_(rescale)  # rescaling the (Q x dh) output is cheaper than the (Q x K) weights
            else:
                torch.bmm(probs, value[part], out=out[part])
        ctx.save_for_backward(query, key, value, content_bias, position_bias, padded_key, allowed)
        ctx.config = (scale, dropout, seed, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no second time
        with torch.autocast(grad_out.device.type, enabled=False):
            return _RelativeAttention._backward(saved, ctx.config, grad_out.to(saved[0].dtype))

    @staticmethod
    def _backward(saved, config, grad_out):
        query, key, value, content_bias, position_bias, padded_key, allowed = saved
        scale, dropout, seed, chunk = config
        rows, q_len = query.shape[:2]
        n_head, width1, _ = padded_key.shape
        grad_query, grad_key, grad_value = (torch.empty_like(t) for t in (query, key, value))  # all rows written
        grad_cb, grad_pb, grad_pk = (torch.zeros_like(t) for t in (content_bias, position_bias, padded_key))
        grad_out = grad_out.contiguous()
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            heads = torch.arange(part.start, part.stop, device=key.device) % n_head
            chunk_pk = padded_key[heads]
            content_query = query[part] + content_bias[heads, None]
            position_query = query[part] + position_bias[heads, None]
            probs = _chunk_probabilities(content_query, position_query, key[part], chunk_pk, allowed, scale)
            g = grad_out[part]
            if dropout:
                keep, rescale = _keep_mask(probs.shape, dropout, seed + start, probs.device)
                g = g * rescale
                grad_probs = torch.bmm(g, value[part].transpose(1, 2)).mul_(keep)
                grad_value[part] = torch.bmm((probs * keep).transpose(1, 2), g)
            else:
                grad_probs = torch.bmm(g, value[part].transpose(1, 2))
                grad_value[part] = torch.bmm(probs.transpose(1, 2), g)
            # softmax backward, one fused kernel: dS = P * (dP - sum(dP * P)); masked entries have P = 0.
            grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(scale)
            grad_cq = torch.bmm(grad_scores, key[part])
            grad_key[part] = torch.bmm(grad_scores.transpose(1, 2), content_query)
            grad_position = grad_scores.new_zeros(part.stop - part.start, q_len, width1)
            shifted_view(grad_position, q_len, allowed.shape[1]).copy_(grad_scores)
            grad_pq = torch.bmm(grad_position, chunk_pk)
            grad_pk.index_add_(0, heads, torch.bmm(grad_position.transpose(1, 2), position_query))
            torch.add(grad_cq, grad_pq, out=grad_query[part])
            grad_cb.index_add_(0, heads, grad_cq.sum(1))
            grad_pb.index_add_(0, heads, grad_pq.sum(1))
        return (grad_query, grad_key, grad_value, grad_cb, grad_pb, grad_pk[:, :-1], None, None, None, None, None)


def relative_attention(query, key, value, content_bias, position_bias, position_key, allowed, scale,
                       dropout=0.0, chunk=None):
    """Relative multi-head attention over (batch x head) rows, row r belonging to head r % H.

    query: (R, Q, dh); key, value: (R, K, dh); content_bias, position_bias: (H, dh), added to the
    query for the content and the position term; position_key: (H, W, dh), row w for distance
    K - 1 - w (W >= K); allowed: (Q, K) bool, query i sits at key position K - Q + i; dropout on
    the attention probabilities. Returns (R, Q, dh).
    """
    if chunk is None:
        budget = CHUNK_ELEMENTS.get(query.device.type, CHUNK_ELEMENTS["cpu"])
        chunk = max(1, budget // (allowed.shape[0] * allowed.shape[1]))
    seed = int(torch.randint(0, 2**62, (1,))) if dropout else 0
    # Keys and values may be views into preallocated buffers: only their rows must be contiguous.
    key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value))
    # Under autocast the projections come in a lower precision than the (float32) biases: the kernel
    # works in one dtype, the query's (the casts carry the gradients back).
    dtype = query.dtype
    key, value, content_bias, position_bias, position_key = (
        t.to(dtype) for t in (key, value, content_bias, position_bias, position_key))
    return _RelativeAttention.apply(query.contiguous(), key, value, content_bias,
                                    position_bias, position_key.contiguous(), allowed, scale, dropout, seed, chunk)


INFERENCE_ELEMENTS = 1 << 23  # Q x K score elements per pass of the inference kernel (32 MB in float32)
QUERY_BLOCK = 64  # long query runs are cut into blocks that skip the keys their mask hides


def _query_blocks(allowed: torch.Tensor):
    """[(q_start, q_end, key_end)]: blocks of query rows and the keys they need. Query i sits at key
    position K - Q + i; a block [s, e) can stop at key K - Q + e when no row of it sees a later
    key (causal rows); otherwise it runs to the last query with all keys."""
    q_len, key_len = allowed.shape
    if q_len < 2 * QUERY_BLOCK:
        return [(0, q_len, key_len)]
    cached = getattr(allowed, "_query_blocks", None)  # masks are reused (e.g. DT's, per window size)
    if cached is not None and cached[0] == (QUERY_BLOCK, allowed._version):
        return cached[1]
    columns = torch.arange(1, key_len + 1, device=allowed.device)
    extent = (allowed * columns).amax(1).tolist()  # last allowed key + 1, per query row
    blocks, start = [], 0
    while start < q_len:
        end = min(start + QUERY_BLOCK, q_len)
        key_end = key_len - q_len + end
        if max(extent[start:end]) > key_end:
            end, key_end = q_len, key_len
        blocks.append((start, end, key_end))
        start = end
    allowed._query_blocks = ((QUERY_BLOCK, allowed._version), blocks)
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
    blocks = _query_blocks(allowed)
    for start in range(0, rows, batch_per_group * n_head):
        part = slice(start, min(start + batch_per_group * n_head, rows))
        grouped = query[part].view(-1, n_head, q_len, d_head)  # (b, H, Q, dh)
        batch = grouped.shape[0]
        for q_start, q_end, key_end in blocks:
            q_rows = q_end - q_start
            block = grouped[:, :, q_start:q_end]
            content_query = (block + content_bias[:, None]).reshape(-1, q_rows, d_head)
            position_query = (block + position_bias[:, None]).transpose(0, 1).reshape(n_head, batch * q_rows, d_head)
            # column w of the full table holds distance K - 1 - w: drop the K - key_end largest ones
            position_scores = torch.bmm(position_query, padded_key[:, :, key_len - key_end:])
            position_scores = position_scores.view(n_head, batch, q_rows, -1).transpose(0, 1)
            position_scores = position_scores.reshape(batch * n_head, q_rows, -1)
            scores = torch.baddbmm(shifted_view(position_scores, q_rows, key_end), content_query,
                                   key[part, :key_end].transpose(1, 2), beta=scale, alpha=scale)
            probs = scores.masked_fill_(blocked[q_start:q_end, :key_end], float("-inf")).softmax(dim=-1)
            torch.bmm(probs, value[part, :key_end], out=out[part, q_start:q_end])
            if need_weights:
                weights[part, q_start:q_end, :key_end] = probs
    return out, weights
