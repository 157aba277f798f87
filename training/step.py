"""The segment-recurrent training step (the paper's training scheme; README, "The model").

A training sample is K*N steps. Recurrent modes (rate, rmt, trxl) cut it into N segments of K steps
and run them in order, carrying memory tokens and the Transformer-XL cache:

    bptt (default): one graph through all N segments, one backward of the mean segment loss,
                    one optimiser step. The write path and the MRV learn what to remember.
    detached:       the reference scheme: detach memory between segments, backward and step once
                    per segment. The MRV never receives a gradient.

DT processes the whole K*N window as one segment.
"""

import contextlib
import warnings

import torch
import torch.nn.functional as F

from rate_core.model import ACTION_PAD, MemoryState, MemoryTransformer

MEMORY_GRADS = ("bptt", "detached")


def action_loss_sum(logits: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of logits (B, T, A) against actions (B, T); padding (ACTION_PAD) is ignored.
    weights (B, T): each step's cross-entropy multiplied by its weight (None: all 1)."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), actions.reshape(-1).long(),
                             ignore_index=ACTION_PAD, reduction="sum" if weights is None else "none")
    return losses if weights is None else (losses * weights.reshape(-1).to(losses.dtype)).sum()


def segment_slices(model: MemoryTransformer, total_steps: int) -> list[slice]:
    """Time slices of the segments of a total_steps-long sample, in order."""
    length = model.config.segment_steps
    return [slice(start, start + length) for start in range(0, total_steps, length)]


def detach_state(state: MemoryState) -> MemoryState:
    memory = None if state.memory is None else state.memory.detach()
    return MemoryState(memory, state.cache)


class SegmentLosses(torch.nn.Module):
    """The losses of consecutive segments of a batch in one module call, carrying memory and cache
    between them: one forward per backward, as DistributedDataParallel expects."""

    def __init__(self, model: MemoryTransformer):
        super().__init__()
        self.model = model

    def forward(self, rtg, obs, actions, times: list[slice], counts: list[float], state=None, targets=None,
                aux_targets=None, aux_weight: float = 0.0, weights=None, aux_counts: list[float] | None = None):
        """Returns (sum of the per-segment mean losses or None, per-segment detached action losses,
        state). counts: the number of targets of each segment that its summed loss is divided by.
        targets: the actions to predict (default: the input actions). aux_targets (B, T): the classes
        the model's auxiliary head predicts (ACTION_PAD where none), their mean cross-entropy
        weighted by aux_weight added to each segment's loss (the returned values stay the action
        losses). weights (B, T): each step's weight in the action loss (then counts are the segments'
        summed weights; None: every target weighs 1). aux_counts: the number of auxiliary targets of each
        segment, which its auxiliary loss is divided by (default: counts, the same where no weights)."""
        aux_counts = counts if aux_counts is None else aux_counts
        targets = actions if targets is None else targets
        total, values = None, []
        for seg, count, aux_count in zip(times, counts, aux_counts, strict=True):
            logits, aux_logits, state = self.model.segment(rtg[:, seg], obs[:, seg], actions[:, seg], state)
            if count:
                loss = action_loss_sum(logits, targets[:, seg], None if weights is None else weights[:, seg]) / count
                values.append(loss.detach())
                if aux_weight and aux_count:
                    loss = loss + aux_weight * action_loss_sum(aux_logits, aux_targets[:, seg]) / aux_count
                total = loss if total is None else total + loss
            else:
                values.append(None)
        return total, values, state


def _optimizer_step(model, optimizer, grad_clip, scheduler, on_update=None):
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if on_update is not None:
        on_update()
    if scheduler is not None:
        scheduler.step()


def _schedule_step(scheduler) -> None:
    """Step the schedule without an update (torch warns of a schedule stepped before the optimiser, which
    here is meant: the step it would have made is skipped, not late)."""
    if scheduler is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            scheduler.step()


def train_step(model: MemoryTransformer, optimizer: torch.optim.Optimizer, rtg, obs, actions, targets=None,
               memory_grad: str = "bptt", grad_clip: float = 1.0, scheduler=None,
               micro_batch: int | None = None, runner: torch.nn.Module | None = None,
               aux_targets=None, aux_weight: float = 0.0, weights=None, on_update=None) -> list[float]:
    """One training step on a batch of K*N-step samples.

    rtg (B, K*N) float; obs (B, K*N, *obs_shape); actions (B, K*N) long, ACTION_PAD for padding.
    targets (B, K*N) long: the actions to predict where they are not the input actions (an expert's
    labels of another policy's steps, padded where actions are); default: actions.
    micro_batch: process the batch in pieces of this many samples and accumulate gradients (the
    same update as the whole batch at once, with less memory and better cache use on a CPU).
    runner: SegmentLosses(model), possibly wrapped in DistributedDataParallel; then this process's
    batch is its shard of the global batch, losses are normalised by the global target counts and
    the update equals one process training on the global batch.
    aux_targets (B, K*N) long, aux_weight: the auxiliary loss (SegmentLosses), for a model with an
    auxiliary head; its targets are the steps' auxiliary labels, padded where the actions are.
    weights (B, K*N) float: each step's weight in the action loss, which is then a weighted mean
    (e.g. train --keyframe-weight); None: the plain mean.
    scheduler: stepped once per update (per segment when detached), also where a segment (detached)
    or the batch has no targets and no update is made, so that the schedule ends where planned.
    on_update: called after each optimiser step (e.g. a moving average of the weights), not where no
    update is made.
    Returns the mean loss of each segment that has targets (a list of floats, in segment order;
    over the global batch when distributed).
    """
    if memory_grad not in MEMORY_GRADS:
        raise ValueError(f"memory_grad={memory_grad!r}, expected one of {MEMORY_GRADS}")
    if aux_weight and (aux_targets is None or model.aux_head is None):
        raise ValueError("aux_weight needs aux_targets and a model with an auxiliary head (ModelConfig.aux_classes)")
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1 (None: the whole batch at once), got {micro_batch}")
    for name, value in (("targets", targets), ("aux_targets", aux_targets), ("weights", weights)):
        if value is not None and tuple(value.shape) != tuple(actions.shape):
            raise ValueError(f"{name} must have the actions' shape {tuple(actions.shape)} (B, K*N), "
                             f"got {tuple(value.shape)}")
    if runner is None:  # not `runner or ...`: a torch.compile'd module has no truth value (it raises)
        runner = SegmentLosses(model)
    distributed = isinstance(runner, torch.nn.parallel.DistributedDataParallel)
    world = torch.distributed.get_world_size() if distributed else 1
    runner.train()
    batch = actions.shape[0]
    step = micro_batch or batch
    parts = [slice(start, start + step) for start in range(0, batch, step)]
    times = segment_slices(model, actions.shape[1])
    # Per-segment target counts over the whole (global) batch, so that pieces add up to batch means.
    targets = actions if targets is None else targets
    valid = targets != ACTION_PAD
    counted = [(valid[:, seg] if weights is None else (weights * valid)[:, seg]).sum() for seg in times]
    separate_aux = bool(aux_weight) and weights is not None  # weighted action targets: the auxiliary ones count 1
    if separate_aux:
        counted += [(aux_targets[:, seg] != ACTION_PAD).sum() for seg in times]
    counts_tensor = torch.stack(counted).to(torch.float64)
    if distributed:
        torch.distributed.all_reduce(counts_tensor)
    # the highest action and target read with the counts, in one wait for the device (the model checks its
    # inputs' actions itself only on the CPU, where that costs no wait)
    highest = torch.stack([actions.max(), targets.max()]).to(torch.float64)
    *counts, top_action, top_target = torch.cat([counts_tensor, highest]).tolist()
    counts, aux_counts = (counts[:len(times)], counts[len(times):]) if separate_aux else (counts, counts)
    for name, top in (("actions", top_action), ("targets", top_target)):
        if top >= model.config.act_dim:
            raise ValueError(f"{name} must be from 0 to {model.config.act_dim - 1} ({ACTION_PAD}: padding), got "
                             f"{int(top)}")
    active = [i for i, count in enumerate(counts) if count]
    losses = torch.zeros(len(times), dtype=torch.float64, device=actions.device)
    # DistributedDataParallel averages gradients over processes; the losses here are partial sums.
    scale = float(world)

    def run(part, which, state, sync: bool):
        context = runner.no_sync() if distributed and not sync else contextlib.nullcontext()
        with context:
            total, values, state = runner(rtg[part], obs[part], actions[part], [times[i] for i in which],
                                          [counts[i] for i in which], state, targets[part],
                                          None if aux_targets is None else aux_targets[part], aux_weight,
                                          None if weights is None else weights[part], [aux_counts[i] for i in which])
            for i, value in zip(which, values, strict=True):
                if value is not None:
                    losses[i] += value.to(torch.float64)
            if total is None and distributed and any(counts[i] for i in which):
                # no targets in this process's shard, but in others': every process must run backward
                total = sum(p.sum() for p in model.parameters()) * 0.0
            return total, state

    if memory_grad == "bptt":
        for p, part in enumerate(parts):
            total, _ = run(part, range(len(times)), None, sync=p == len(parts) - 1)
            if total is not None:
                (total * (scale / len(active))).backward()
        if active:
            _optimizer_step(model, optimizer, grad_clip, scheduler, on_update)
        else:  # nothing to learn from: no update, but the schedule keeps pace with the steps
            _schedule_step(scheduler)
    else:
        states = [None] * len(parts)
        for i in range(len(times)):
            for p, part in enumerate(parts):
                total, state = run(part, [i], states[p], sync=p == len(parts) - 1)
                if total is not None:
                    (total * scale).backward()
                states[p] = detach_state(state)
            if counts[i]:
                _optimizer_step(model, optimizer, grad_clip, scheduler, on_update)
            else:  # a segment of padding only: no update, the schedule keeps pace
                _schedule_step(scheduler)
    if distributed:
        torch.distributed.all_reduce(losses)
    return [float(losses[i]) for i in active]


if __name__ == "__main__":
    raise SystemExit("training.step is the training step of training.train; it has no command of its own: "
                     "python -m training.train --help")
