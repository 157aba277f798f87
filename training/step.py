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


def action_loss(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor | None:
    """Cross-entropy of logits (B, T, A) against actions (B, T); padding (ACTION_PAD) is ignored.
    Returns None when every target is padding."""
    valid = actions != ACTION_PAD
    if not bool(valid.any()):
        return None
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), actions.reshape(-1).long(), ignore_index=ACTION_PAD)


def segments(model: MemoryTransformer, rtg, obs, actions):
    """Yield (rtg, obs, actions) for each segment of a (B, K*N, ...) batch, in order."""
    length = model.config.segment_steps
    for start in range(0, actions.shape[1], length):
        yield rtg[:, start : start + length], obs[:, start : start + length], actions[:, start : start + length]


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
               memory_grad: str = "bptt", grad_clip: float = 1.0, scheduler=None) -> list[float]:
    """One training step on a batch of K*N-step samples.

    rtg (B, K*N) float; obs (B, K*N, *obs_shape); actions (B, K*N) long, ACTION_PAD for padding.
    Returns the loss of each segment that has targets (a list of floats, in segment order).
    """
    if memory_grad not in MEMORY_GRADS:
        raise ValueError(f"memory_grad={memory_grad!r}, expected one of {MEMORY_GRADS}")
    model.train()
    state = None
    losses = []
    for seg_rtg, seg_obs, seg_actions in segments(model, rtg, obs, actions):
        logits, state = model(seg_rtg, seg_obs, seg_actions, state)
        loss = action_loss(logits, seg_actions)
        if memory_grad == "detached":
            if loss is not None:
                loss.backward()
                _optimizer_step(model, optimizer, grad_clip, scheduler)
                losses.append(loss.item())
            state = detach_state(state)
        elif loss is not None:
            losses.append(loss)
    if memory_grad == "bptt" and losses:
        torch.stack(losses).mean().backward()
        _optimizer_step(model, optimizer, grad_clip, scheduler)
        losses = [loss.item() for loss in losses]
    return losses
