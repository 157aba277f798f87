"""The segment-recurrent training step (model.md section 5).

A training sample is K*N steps. Recurrent modes (rate, rmt, trxl) cut it into N segments of K steps
and run them in order, carrying memory tokens and the Transformer-XL cache:

    bptt (default): one graph through all N segments, one backward of the mean segment loss,
                    one optimiser step. The write path and the MRV learn what to remember.
    detached:       the reference scheme: detach memory between segments, backward and step once
                    per segment. The MRV never receives a gradient.

DT processes the whole K*N window as one segment.
"""

import torch
import torch.nn.functional as F

from rate_core.model import ACTION_PAD, MemoryState, MemoryTransformer

MEMORY_GRADS = ("bptt", "detached")


def action_loss_sum(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits (B, T, A) against actions (B, T); padding (ACTION_PAD) is ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), actions.reshape(-1).long(),
                           ignore_index=ACTION_PAD, reduction="sum")


def segment_slices(model: MemoryTransformer, total_steps: int) -> list[slice]:
    """Time slices of the segments of a total_steps-long sample, in order."""
    length = model.config.segment_steps
    return [slice(start, start + length) for start in range(0, total_steps, length)]


def detach_state(state: MemoryState) -> MemoryState:
    memory = None if state.memory is None else state.memory.detach()
    return MemoryState(memory, state.cache)


def _optimizer_step(model, optimizer, grad_clip, scheduler):
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()


def train_step(model: MemoryTransformer, optimizer: torch.optim.Optimizer, rtg, obs, actions,
               memory_grad: str = "bptt", grad_clip: float = 1.0, scheduler=None,
               micro_batch: int | None = None) -> list[float]:
    """One training step on a batch of K*N-step samples.

    rtg (B, K*N) float; obs (B, K*N, *obs_shape); actions (B, K*N) long, ACTION_PAD for padding.
    micro_batch: process the batch in pieces of this many samples and accumulate gradients (the
    same update as the whole batch at once, with less memory and better cache use on a CPU).
    Returns the mean loss of each segment that has targets (a list of floats, in segment order).
    """
    if memory_grad not in MEMORY_GRADS:
        raise ValueError(f"memory_grad={memory_grad!r}, expected one of {MEMORY_GRADS}")
    model.train()
    batch = actions.shape[0]
    step = micro_batch or batch
    parts = [slice(start, start + step) for start in range(0, batch, step)]
    times = segment_slices(model, actions.shape[1])
    # Per-segment target counts over the whole batch, so that micro-batches add up to batch means.
    counts = [int((actions[:, seg] != ACTION_PAD).sum()) for seg in times]
    active = [i for i, count in enumerate(counts) if count]
    losses = [0.0] * len(times)

    def segment_loss(part, i, state):
        logits, state = model(rtg[part, times[i]], obs[part, times[i]], actions[part, times[i]], state)
        loss = action_loss_sum(logits, actions[part, times[i]]) / counts[i] if counts[i] else None
        if loss is not None:
            losses[i] += loss.item()
        return loss, state

    if memory_grad == "bptt":
        for part in parts:
            state, total = None, 0.0
            for i in range(len(times)):
                loss, state = segment_loss(part, i, state)
                if loss is not None:
                    total = total + loss
            if active:
                (total / len(active)).backward()
        if active:
            _optimizer_step(model, optimizer, grad_clip, scheduler)
    else:
        states = [None] * len(parts)
        for i in range(len(times)):
            for p, part in enumerate(parts):
                loss, state = segment_loss(part, i, states[p])
                if loss is not None:
                    loss.backward()
                states[p] = detach_state(state)
            if counts[i]:
                _optimizer_step(model, optimizer, grad_clip, scheduler)
    return [losses[i] for i in active]
