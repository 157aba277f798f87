"""Train RATE, RMT, TrXL or DT on a task's offline dataset.

    python -m training.collect --task tmaze
    python -m training.train --task tmaze --model rate                 # -> runs/tmaze/rate/model
    python -m training.train --task tmaze --model rate --resume        # continue after a kill
    python -m training.train --task tmaze --model rate --memory-grad detached   # the reference scheme
    torchrun --nproc_per_node=4 -m training.train --task tmaze --model rate    # several GPUs (or CPU procs)

Under torchrun every process trains on its shard of each global batch (--batch-size is global)
with DistributedDataParallel (nccl on GPUs, gloo on CPU); process 0 logs, evaluates and writes
checkpoints; the update equals one process training on the global batch.

Every epoch writes runs/<task>/<model>/last (model + optimiser + schedule + RNG) atomically, and
`--resume` continues from it exactly: an interrupted and resumed run ends with the same weights as
an uninterrupted one. The finished model is written to runs/<task>/<model>/model, and log.jsonl
holds the loss per step and the periodic evaluations; curves.png draws them after every epoch
(`python -m training.curves RUN [RUN ...]` draws several runs side by side).
"""

import contextlib
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rate_core.checkpoint import (TRAINING_STATE_NAMES, CheckpointError, load_checkpoint, recover_folder,
                                  save_checkpoint)
from rate_core.model import ACTION_PAD, MemoryTransformer, ModelConfig
from rate_core.paper import paper_config
from rate_core.tasks import get_task, result_key
from training.cli import NONE_DEFAULT, OWN_DEFAULT, TASK_DEFAULT, cli, device_or_exit, run_main
from training.curves import read_log, write_curves
from training.dataset import Dataset, DatasetError, load_dataset
from training.evaluate import evaluate
from training.figures import metric_label
from training.step import MEMORY_GRADS, SegmentLosses, action_loss_sum, segment_slices, train_step

STATE_JSON, STATE_TENSORS = TRAINING_STATE_NAMES
ARCHS = ("task", "paper")


@dataclass
class TrainConfig:
    """Train a memory transformer on an offline dataset. Unset hyper-parameters take the task's defaults."""

    task: str = "tmaze"
    """task name from the registry (rate_core.tasks)"""
    model: str = "rate"
    """rate | rmt | trxl | dt (architecture: the task's default config for that mode)"""
    arch: str = "task"
    """task (the registry's config, sized for a CPU) | paper (the paper's published architecture,
    rate_core.paper: larger, for a GPU)"""
    action_inputs: bool = True
    """feed the actions taken to the model (--no-action-inputs: returns and observations only, so
    the policy cannot copy its own past actions; see ModelConfig.action_inputs)"""
    data: Annotated[Path | None, OWN_DEFAULT] = None
    """dataset folder (default: data/<task>/expert, made by python -m training.collect)"""
    out: Annotated[Path | None, OWN_DEFAULT] = None
    """run folder (default: runs/<task>/<model>)"""
    epochs: Annotated[int | None, TASK_DEFAULT] = None
    """passes over the dataset"""
    batch_size: Annotated[int | None, TASK_DEFAULT] = None
    """samples per optimiser step"""
    learning_rate: Annotated[float | None, TASK_DEFAULT] = None
    """peak AdamW learning rate"""
    weight_decay: Annotated[float | None, TASK_DEFAULT] = None
    """AdamW weight decay"""
    warmup_steps: Annotated[int | None, TASK_DEFAULT] = None
    """optimiser steps of linear warm-up"""
    decay: str = "cosine"
    """learning-rate decay after warm-up: cosine | linear | none (to 10% of the peak)"""
    grad_clip: Annotated[float | None, TASK_DEFAULT] = None
    """gradient-norm clipping (0: off)"""
    memory_grad: str = "bptt"
    """bptt (train memory through all segments) | detached (the reference scheme)"""
    random_offsets: bool = False
    """shift each episode's tiling into windows by a random offset every epoch, so an epoch shows
    windows (and segment boundaries) the last one did not; every step stays in a window"""
    shift_augment: int = 0
    """random-shift augmentation of image observations (as DrQ): every training window's frames move by
    one offset drawn from [-N, N] pixels per axis, edges repeated; makes memorising the episodes harder
    (0: off)"""
    micro_batch: int = 0
    """samples per forward/backward, gradients accumulated (0: the whole batch)"""
    seed: int = 0
    """seed of initialisation, data order and dropout"""
    device: str = "auto"
    """cpu, cuda or auto"""
    eval_every: int = 5
    """evaluate every this many epochs (0: never)"""
    eval_episodes: int = 20
    """episodes per evaluation setting during training"""
    resume: bool = False
    """continue the run in `out` from its last completed epoch"""
    dropout: float | None = None
    """override the model config's dropout and attention dropout"""
    model_set: Annotated[tuple[str, ...], NONE_DEFAULT] = ()
    """override fields of the architecture (after --arch and --dropout), as FIELD=VALUE pairs of
    rate_core.model.ModelConfig, e.g. --model-set n_head=8 conv_channels=32,64,64 use_ffn=true"""
    bf16: bool = False
    """bfloat16 autocast of the forward pass, on CUDA or on the CPU (worth it where the CPU has bfloat16
    instructions, e.g. avx512_bf16: a ViZDoom RATE step took 1.3x less time there; without them autocast
    emulates bfloat16 and is several times slower, and training warns); weights and optimiser stay float32"""
    max_minutes: float | None = None
    """stop after this many minutes of training (at the end of a batch; a resumed run counts its earlier
    sittings too) and write the model as it is then; the learning rate decays by steps or by time,
    whichever is further along (for a fixed time budget)"""
    compile: bool = False
    """torch.compile the model (a minute or more to compile; on one H100 the T-Maze models then ran no faster
    overall: measure yours with python -m training.bench_train --compile first)"""
    curves: bool = True
    """draw the run's training curves into curves.png in the run folder after every epoch (training.curves;
    --no-curves: don't)"""
    val_data: Path | None = None
    """held-out dataset of the same task (e.g. collect --seed away from the training data's seeds): the
    model's loss on it (dropout off) is logged after every epoch as val_loss, to tell overfitting apart
    (the mean over all held-out steps; the training loss is the mean of the segments' means, in which the
    later segments' fewer real steps count as much: the two differ a little even without overfitting)"""
    val_windows: int = 256
    """at most this many windows of --val-data (a fixed random subset) for val_loss"""
    ema: float = 0.0
    """keep an exponential moving average of the weights with this decay per optimiser step (e.g. 0.999:
    about the last 1,000 steps), warmed up as min(ema, (1 + n) / (10 + n)) after n steps; the finished model,
    the held-out loss and the periodic evaluations use the averaged weights (0: off)"""
    init: Path | None = None
    """start from this checkpoint's weights (a folder from train or assets/checkpoints/...; its
    architecture must be the run's) instead of a fresh initialisation: fine-tuning; the optimiser and
    the learning-rate schedule start afresh (None: fresh weights)"""
    action_dropout: float = 0.0
    """probability that an action input is hidden from the model during training (replaced by the
    unknown-action token the current step has), drawn anew for every step of every window, so the
    policy must read the observations where it could copy its own last action (0: off)"""
    keyframe_weight: float = 1.0
    """weight in the action loss of the steps whose target differs from the action taken just before
    (where copying one's last action is wrong: keyframes, as in keyframe-focused imitation); the loss
    is the weighted mean (1: every step alike)"""
    aux_weight: float = 0.0
    """weight of the auxiliary loss (0: off): an extra linear head predicts, at every step, what the
    agent must remember (the task's aux_label, e.g. ViZDoom's pillar colour; the dataset must hold
    it, as training.collect writes it), so the colour seen early has to reach memory; acting does
    not use the head"""


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill unset fields from the task's defaults and check the rest."""
    task = get_task(config.task)
    defaults = asdict(task.train)
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    for name, value in defaults.items():
        if name in values and values[name] is None:
            values[name] = value
    values["data"] = values["data"] or Path("data") / task.name / "expert"
    values["out"] = values["out"] or Path("runs") / task.name / config.model
    resolved = TrainConfig(**values)
    if resolved.memory_grad not in MEMORY_GRADS:
        raise ValueError(f"--memory-grad must be one of {MEMORY_GRADS}, got {resolved.memory_grad!r}")
    if resolved.decay not in ("cosine", "linear", "none"):
        raise ValueError(f"--decay must be cosine, linear or none, got {resolved.decay!r}")
    if resolved.shift_augment < 0:
        raise ValueError(f"--shift-augment must be 0 (off) or a number of pixels, got {resolved.shift_augment}")
    if resolved.val_windows < 1:
        raise ValueError(f"--val-windows must be at least 1, got {resolved.val_windows}")
    for flag, value, lowest in (("--epochs", resolved.epochs, 1), ("--batch-size", resolved.batch_size, 1),
                                ("--micro-batch", resolved.micro_batch, 0), ("--eval-every", resolved.eval_every, 0),
                                ("--warmup-steps", resolved.warmup_steps, 0), ("--grad-clip", resolved.grad_clip, 0),
                                ("--weight-decay", resolved.weight_decay, 0),
                                ("--learning-rate", resolved.learning_rate, 0)):
        if value < lowest:
            raise ValueError(f"{flag} must be at least {lowest}, got {value}")
    if resolved.eval_every and resolved.eval_episodes < 2:
        raise ValueError(f"--eval-episodes must be at least 2, got "
                         f"{resolved.eval_episodes}; or --eval-every 0 to evaluate never")
    if not 0 <= resolved.seed < 2**32:
        raise ValueError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {resolved.seed}")
    out = Path(resolved.out)
    nearest = next(folder for folder in (out, *out.parents) if folder.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK):
        raise ValueError(f"--out {out}: " + ("a file; give a folder for the run" if nearest == out else
                                             f"cannot be made ({nearest} is a file or read-only)"))
    if resolved.max_minutes is not None and not resolved.max_minutes > 0:
        raise ValueError(f"--max-minutes must be positive (leave it out for no limit), got {resolved.max_minutes}")
    device_or_exit(resolved.device)
    if resolved.arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {resolved.arch!r}")
    if resolved.aux_weight < 0:
        raise ValueError(f"--aux-weight must be 0 (off) or positive, got {resolved.aux_weight}")
    if resolved.aux_weight and not task.aux_classes:
        raise ValueError(f"--aux-weight: task {task.name} has no auxiliary label (Task.aux_label); leave it at 0")
    if not 0.0 <= resolved.action_dropout < 1.0:
        raise ValueError(f"--action-dropout must be a probability in [0, 1), got {resolved.action_dropout}")
    if resolved.action_dropout and not resolved.action_inputs:
        raise ValueError("--action-dropout hides action inputs, but --no-action-inputs has none; use one of the two")
    if resolved.keyframe_weight <= 0:
        raise ValueError(f"--keyframe-weight must be positive (1: off), got {resolved.keyframe_weight}")
    if not 0.0 <= resolved.ema < 1.0:
        raise ValueError(f"--ema must be 0 (off) or a decay in (0, 1) such as 0.999, got {resolved.ema}")
    model_config_of(resolved)  # raises for an unknown mode, or a task the paper has no config for
    return resolved


def shared_elapsed(started_at: float, device: torch.device, world: int) -> float:
    """Seconds since `started_at` by process 0's clock: with several processes every one gets the same,
    so that --max-minutes stops them at the same batch and the time-decayed learning rate, the same in
    each, keeps their weights the same."""
    elapsed = time.monotonic() - started_at
    if world > 1:
        value = torch.tensor([elapsed], dtype=torch.float64, device=device)
        dist.broadcast(value, src=0)
        elapsed = float(value.item())
    return elapsed


# Fields --model-set may change: the size and regularisation of the network, and the segments per
# training window (how far back training asks memory to carry), not what it reads or how memory
# flows (those follow --task, --model, --no-action-inputs and --aux-weight).
SETTABLE_FIELDS = ("d_model", "n_layer", "n_head", "d_head", "use_ffn", "d_inner", "dropout", "dropatt",
                   "num_mem_tokens", "mem_len", "n_head_ca", "conv_channels", "sections")


def model_overrides(pairs: tuple[str, ...]) -> dict:
    """Parse --model-set FIELD=VALUE pairs into ModelConfig field values."""
    types = {f.name: f.type for f in fields(ModelConfig)}
    overrides = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in SETTABLE_FIELDS:
            raise ValueError(f"--model-set {pair!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(SETTABLE_FIELDS)}")
        kind = types[name]
        try:
            if name == "conv_channels":
                parts = text.split(",")
                if len(parts) != 3 or not all(c.strip().isdigit() for c in parts):
                    raise ValueError("three channel counts, e.g. 32,64,64")
                value = tuple(int(c) for c in parts)
            elif kind in (bool, "bool"):
                if text.strip().lower() not in ("true", "false", "1", "0"):
                    raise ValueError("true or false")
                value = text.strip().lower() in ("true", "1")
            elif kind in (int, "int"):
                if not text.strip().lstrip("-").isdigit():
                    raise ValueError("a whole number")
                value = int(text)
            else:
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError("a number") from None
        except ValueError as error:
            raise ValueError(f"--model-set {pair!r}: {name} needs {error}") from None
        overrides[name] = value
    return overrides


def model_config_of(config: TrainConfig) -> ModelConfig:
    """The architecture a run trains: the task's registry config or the paper's, with --dropout,
    --model-set, --no-action-inputs and --aux-weight (an auxiliary head) applied."""
    if config.arch == "paper":
        model_config = paper_config(config.task, config.model)
    else:
        model_config = get_task(config.task).model_config(config.model)
    if config.dropout is not None:
        model_config = replace(model_config, dropout=config.dropout, dropatt=config.dropout)
    if config.model_set:
        model_config = replace(model_config, **model_overrides(config.model_set))
    if not config.action_inputs:
        model_config = replace(model_config, action_inputs=False)
    if config.aux_weight:
        model_config = replace(model_config, aux_classes=get_task(config.task).aux_classes)
    return model_config


def windows(dataset: Dataset, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(episode, start) of every training sample: each episode tiled into windows of `length`
    steps from its first step (the last one padded). With `rng`, each episode's tiling starts at a
    random offset in [0, length) instead, plus a window from step 0 so the offset's steps are kept."""
    pairs = []
    for e, steps in enumerate(dataset.episode_lengths()):
        offset = int(rng.integers(0, min(length, steps))) if rng is not None else 0
        if offset:
            pairs.append((e, 0))
        pairs.extend((e, start) for start in range(offset, steps, length))
    return np.array(pairs, dtype=np.int64)


def epoch_windows(dataset: Dataset, length: int, seed: int, epoch: int, random_offsets: bool) -> np.ndarray:
    """The samples of one epoch: the fixed tiling, or (random_offsets) a tiling drawn from (seed, epoch),
    so a resumed run sees the same windows."""
    if not random_offsets:
        return windows(dataset, length)
    return windows(dataset, length, np.random.default_rng([seed, epoch, 1]))


def make_batch(dataset: Dataset, index: np.ndarray, length: int, device, aux: bool = False) -> tuple[torch.Tensor, ...]:
    """rtg, observations, actions (the model's inputs) and targets of the samples `index` (episode, start);
    with aux, their auxiliary labels too."""
    parts = [dataset.training_window(int(e), int(s), length) + ((dataset.aux_window(int(e), int(s), length),)
                                                                 if aux else ()) for e, s in index]
    return tuple(torch.from_numpy(np.stack(p)).to(device) for p in zip(*parts, strict=True))


def held_out_loss(model: MemoryTransformer, dataset: Dataset, index: np.ndarray, length: int, device,
                  autocast=contextlib.nullcontext(), batch_size: int = 32) -> float:
    """The model's mean cross-entropy per target step on the samples `index` (episode, start) of
    `length` steps, segment by segment as in training, in evaluation mode (no dropout, no gradients,
    no random draws); the model's mode is restored after."""
    return held_out_scores(model, dataset, index, length, device, autocast, batch_size)[0]


def held_out_scores(model: MemoryTransformer, dataset: Dataset, index: np.ndarray, length: int, device,
                    autocast=contextlib.nullcontext(), batch_size: int = 32) -> tuple[float, list[float] | None]:
    """held_out_loss() and, in the same pass, for a model with an auxiliary head on a dataset with
    auxiliary labels, how often the head's most likely class is the step's label, per segment
    (memory carried as in training): whether what the first segment saw is still known in the
    later ones (else None)."""
    was_training = model.training
    model.eval()
    times = segment_slices(model, length)
    aux = model.aux_head is not None and dataset.aux_labels is not None
    total, count = 0.0, 0
    right, seen = np.zeros(len(times)), np.zeros(len(times))
    try:
        with torch.no_grad(), autocast:
            for first in range(0, len(index), batch_size):
                rtg, obs, actions, targets, *labels = make_batch(dataset, index[first:first + batch_size], length,
                                                                 device, aux=aux)
                state = None
                for i, seg in enumerate(times):
                    logits, aux_logits, state = model.segment(rtg[:, seg], obs[:, seg], actions[:, seg], state)
                    total += float(action_loss_sum(logits, targets[:, seg]))
                    count += int((targets[:, seg] != ACTION_PAD).sum())
                    if aux:
                        valid = labels[0][:, seg] != ACTION_PAD
                        right[i] += int((aux_logits.argmax(-1) == labels[0][:, seg])[valid].sum())
                        seen[i] += int(valid.sum())
    finally:
        model.train(was_training)
    accuracy = [float(r / n) if n else float("nan") for r, n in zip(right, seen, strict=True)] if aux else None
    return total / max(count, 1), accuracy


def shift_offsets(pad: int, samples: int, seed: int, epoch: int, batch: int) -> np.ndarray:
    """(samples, 2) offsets (dy, dx) in [-pad, pad] for one global batch, drawn from (seed, epoch, batch):
    a resumed run draws the same, and each torchrun process takes its samples' rows."""
    return np.random.default_rng([seed, epoch, batch, 2]).integers(-pad, pad + 1, size=(samples, 2))


def drop_actions(actions: torch.Tensor, probability: float, seed: int, epoch: int, batch: int,
                 samples: int | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """actions (B, L) with each action that is not padding replaced by ACTION_PAD (the unknown-action token)
    with `probability`, drawn from (seed, epoch, batch) so a resumed run hides the same; a new tensor.
    samples, rows: the global batch's size and this process's rows of it (under torchrun)."""
    draws = np.random.default_rng([seed, epoch, batch, 3]).random((samples or len(actions), actions.shape[1]))[rows]
    hide = torch.from_numpy(draws < probability).to(actions.device)
    return torch.where(hide & (actions != ACTION_PAD), torch.full_like(actions, ACTION_PAD), actions)


def keyframe_weights(actions: torch.Tensor, targets: torch.Tensor, weight: float) -> torch.Tensor | None:
    """(B, L) loss weights: `weight` at the steps whose target differs from the action taken at the step
    before in the window, 1 elsewhere (and at each window's first step); None when weight is 1."""
    if weight == 1.0:
        return None
    weights = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
    weights[:, 1:][(targets[:, 1:] != actions[:, :-1]) & (targets[:, 1:] != ACTION_PAD)] = weight
    return weights


def initial_weights(path: Path, task: str, model_config: ModelConfig) -> dict:
    """The weights of checkpoint `path` for a run of `model_config` (--init): its architecture must match
    (dropout aside, which only acts in training)."""
    saved = load_checkpoint(path, task=task, mode=model_config.mode)
    theirs, ours = asdict(saved.config), asdict(model_config)
    differ = [f"{k}={theirs[k]!r} (the run: {ours[k]!r})" for k in ours
              if k not in ("dropout", "dropatt") and theirs.get(k) != ours[k]]
    if differ:
        raise CheckpointError(f"--init {path}: its architecture differs from this run's: {', '.join(differ)}; "
                              f"give the same --model / --arch / --model-set as it was trained with")
    return saved.state_dict()


def shift_frames(obs: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
    """obs (B, L, C, H, W) with sample b's frames moved by offsets[b] = (dy, dx): pixel (y, x) shows the
    old (y + dy, x + dx), coordinates clamped at the border (edges repeated)."""
    height, width = obs.shape[-2:]
    shifted = torch.empty_like(obs)
    for b, (dy, dx) in enumerate(offsets):
        rows = (torch.arange(height, device=obs.device) + int(dy)).clamp(0, height - 1)
        cols = (torch.arange(width, device=obs.device) + int(dx)).clamp(0, width - 1)
        shifted[b] = obs[b][..., rows, :][..., cols]
    return shifted


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether the CPU has bfloat16 instructions (avx512_bf16 or amx_bf16); None where it cannot tell
    (no /proc/cpuinfo, as on macOS, or no flags line, as on ARM)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return None


def bf16_warning(config: TrainConfig, device: torch.device, has_bf16: bool | None) -> str | None:
    """The warning for --bf16 on a CPU that lacks bfloat16 instructions, where autocast emulates them."""
    if not config.bf16 or device.type != "cpu" or has_bf16 is not False:
        return None
    return ("warning: --bf16 on a CPU without bfloat16 instructions (no avx512_bf16 or amx_bf16 among its flags): "
            "autocast emulates them, several times slower than float32 (a Memory Maze RATE update took 6.5x as "
            "long); leave out --bf16 on this machine")


def draw_curves(run: Path, metric: str) -> Path | None:
    """Write run/curves.png from run/log.jsonl (training.curves). A figure that cannot be drawn must not
    stop the training: it warns and returns None."""
    try:
        return write_curves([read_log(run)], run / "curves.png", metric)
    except Exception as error:  # noqa: BLE001 (matplotlib, fonts, a full disk: none of them worth a run)
        print(f"warning: could not draw {run / 'curves.png'}: {error}", file=sys.stderr)
        return None


def lr_multiplier(step: int, warmup: int, total: int, decay: str) -> float:
    """Linear warm-up to 1, then decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))  # the last step is total - 1
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return 0.1 + 0.9 * shape


class WeightAverage:
    """Exponential moving average of a model's floating-point weights (other entries are copied):
    after optimiser step n, average <- average + (1 - d) (weights - average), d = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay, self.updates = model, decay, 0
        self.live = model.state_dict()  # views of the model's tensors: they see every optimiser step
        self.average = {k: v.clone() for k, v in self.live.items()}

    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for name, value in self.live.items():
                if value.is_floating_point():
                    self.average[name].lerp_(value, 1.0 - decay)
                else:
                    self.average[name].copy_(value)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the block; the trained ones are put back after."""
        trained = {k: v.clone() for k, v in self.live.items()}
        self.model.load_state_dict(self.average)
        try:
            yield
        finally:
            self.model.load_state_dict(trained)


def save_training_state(directory: Path, optimizer, scheduler, epoch: int, step: int, config: TrainConfig,
                        average: WeightAverage | None = None, training_seconds: float = 0.0,
                        dataset: str | None = None) -> None:
    """Optimiser, schedule, progress (with the seconds trained so far, which --max-minutes counts), RNG
    state and the weight average into `directory` (safetensors + JSON, no pickle); dataset: the
    training data's fingerprint (Dataset.fingerprint), which --resume checks."""
    state = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()
               if torch.is_tensor(v)}
    if average is not None:
        tensors.update({f"ema.{k}": v.contiguous() for k, v in average.average.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps({
        "epoch": epoch, "step": step, "training_seconds": training_seconds, "param_groups": state["param_groups"],
        "ema_updates": average.updates if average is not None else None,
        "scheduler": scheduler.state_dict() | {"lr_lambdas": None},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "dataset": dataset, "tensors": sorted(tensors),
    }, indent=2))


def load_training_state(directory: Path, optimizer, scheduler,
                        average: WeightAverage | None = None) -> tuple[int, int, float]:
    """Restore what save_training_state wrote; returns (epoch, step, seconds trained so far)."""
    try:
        meta = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"{directory}: training state unreadable ({error}); the run cannot go on from it: "
                              f"delete {directory.parent} to start over, or give another --out") from error
    try:
        return _restore_training_state(meta, tensors, optimizer, scheduler, average)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        problem = f"{error.args[0]} missing" if isinstance(error, KeyError) else str(error)
        raise CheckpointError(f"{directory}: training state incomplete or damaged ({problem}); the run cannot go on "
                              f"from it: delete {directory.parent} to start over, or give another --out") from error


def _restore_training_state(meta: dict, tensors: dict, optimizer, scheduler, average) -> tuple[int, int, float]:
    missing = sorted(set(meta.get("tensors", ())) - set(tensors))  # (runs from before the list was kept: unchecked)
    if missing:
        raise KeyError(f"{len(missing)} of its tensors ({', '.join(missing[:3])}{', ...' * (len(missing) > 3)})")
    epoch, step = meta["epoch"], meta["step"]
    if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in (epoch, step)):
        raise ValueError(f"epoch and step must be whole numbers, got {epoch!r} and {step!r}")
    state: dict = {"state": {}, "param_groups": meta["param_groups"]}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state["state"].setdefault(int(index), {})[key] = value
    optimizer.load_state_dict(state)
    scheduler_state = meta["scheduler"]
    scheduler_state.pop("lr_lambdas", None)
    scheduler.load_state_dict(scheduler_state | {"lr_lambdas": [None]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    if average is not None and meta.get("ema_updates") is not None:  # else the caller refuses the mismatch
        for name, value in average.average.items():
            value.copy_(tensors[f"ema.{name}"])
        average.updates = meta["ema_updates"]
    return epoch, step, float(meta.get("training_seconds", 0.0))  # 0: saved before it was kept


COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)  # how long processes wait for each other under torchrun


def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_choice in ("auto", "cuda")
    if device_choice not in ("auto", "cuda", "cpu"):
        device = torch.device(device_choice)
    else:
        device = torch.device(f"cuda:{local}" if use_cuda and world > 1 else ("cuda" if use_cuda else "cpu"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The other processes wait at a barrier while process 0 evaluates and writes the checkpoint after
        # an epoch: torch's default limit for a collective (10 minutes for nccl, 30 for gloo) would end
        # them during a long evaluation (ViZDoom's 500-step episodes on a busy CPU, a larger --eval-episodes).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return (dist.get_rank() if world > 1 else 0), world, device


def train(config: TrainConfig, on_epoch_end: Callable[[int], None] | None = None) -> Path:
    """Run (or resume) training; returns the folder of the finished model."""
    config = resolve(config)
    task = get_task(config.task)
    rank, world, device = setup_distributed(config.device)
    main_process = rank == 0
    if config.batch_size < world:
        raise ValueError(f"--batch-size ({config.batch_size}) must be at least the number of processes ({world})")
    dataset = load_dataset(config.data, task=task.name)
    fingerprint = dataset.fingerprint()  # once: --resume checks it, every epoch's training state keeps it
    if config.aux_weight and dataset.aux_labels is None:
        raise DatasetError(f"--aux-weight needs the auxiliary labels ({task.aux_label}) in the dataset, and "
                           f"{config.data} has none: collect it again with this version of training.collect")
    model_config = model_config_of(config)
    sample_len = model_config.context_length * model_config.sections
    samples = windows(dataset, sample_len)
    if config.shift_augment and dataset.observations.ndim != 4:
        raise ValueError(f"--shift-augment moves image frames, but {task.name}'s observations have shape "
                         f"{dataset.observations.shape[1:]}; leave it at 0 for this task")
    if config.shift_augment and config.shift_augment >= min(dataset.observations.shape[-2:]):
        raise ValueError(f"--shift-augment {config.shift_augment} moves the frames ({dataset.observations.shape[-2]} x "
                         f"{dataset.observations.shape[-1]} pixels) by up to their whole size, which leaves only "
                         f"their edges repeated; give fewer pixels (e.g. 4)")
    val_dataset, val_index = None, None
    if config.val_data is not None:
        try:
            val_dataset = load_dataset(config.val_data, task=task.name)
        except DatasetError as error:
            raise DatasetError(f"--val-data (the held-out dataset): {error}") from error
        val_index = windows(val_dataset, sample_len)
        if len(val_index) > config.val_windows:
            pick = np.random.default_rng(0).choice(len(val_index), config.val_windows, replace=False)
            val_index = val_index[np.sort(pick)]
    epoch_samples = [epoch_windows(dataset, sample_len, config.seed, e, True) for e in range(config.epochs)] \
        if config.random_offsets else [samples] * config.epochs
    steps_per_batch = model_config.sections if config.memory_grad == "detached" and config.model != "dt" else 1
    total_steps = sum(math.ceil(len(e) / config.batch_size) for e in epoch_samples) * steps_per_batch

    torch.manual_seed(config.seed)
    model = MemoryTransformer(model_config, task=task.name, training={
        "dataset": str(config.data), "dataset_episodes": dataset.num_episodes, "memory_grad": config.memory_grad,
        "epochs": config.epochs, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
        "seed": config.seed, "processes": world, "arch": config.arch, "action_inputs": config.action_inputs,
        "random_offsets": config.random_offsets, "shift_augment": config.shift_augment, "ema": config.ema,
        "aux_weight": config.aux_weight, "model_set": list(config.model_set),
        "init": None if config.init is None else str(config.init), "action_dropout": config.action_dropout,
        "keyframe_weight": config.keyframe_weight,
    }).to(device)
    if config.init is not None:
        model.load_state_dict(initial_weights(Path(config.init), task.name, model_config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    started_at = time.monotonic()
    time_limit = 60 * config.max_minutes if config.max_minutes else None
    clock = {"elapsed": 0.0}  # training seconds at the start of the batch (all sittings, process 0's clock)

    def multiplier(step: int) -> float:
        if time_limit:  # a time-limited run decays by steps or by time, whichever is further along
            step = max(step, int(total_steps * clock["elapsed"] / time_limit))
        return lr_multiplier(step, config.warmup_steps, total_steps, config.decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    average = WeightAverage(model, config.ema) if config.ema else None
    averaged = average.applied if average is not None else contextlib.nullcontext

    out = Path(config.out)
    last = out / "last"
    start_epoch, step = 0, 0
    recover_folder(last)  # a run killed while it swapped in a new `last` left the old or the new beside it
    if config.resume and (last / STATE_JSON).exists():
        try:
            saved_state = json.loads((last / STATE_JSON).read_text())
            saved_config = saved_state["config"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{last / STATE_JSON}: unreadable ({error}); delete {last} to start over") from error
        saved_config.setdefault("arch", "task")  # runs from before --arch existed
        saved_config.setdefault("action_inputs", True)  # and before --no-action-inputs
        saved_config.setdefault("random_offsets", False)  # and before --random-offsets
        saved_config.setdefault("shift_augment", 0)  # and before --shift-augment
        saved_config.setdefault("ema", 0.0)  # and before --ema
        saved_config.setdefault("aux_weight", 0.0)  # and before --aux-weight
        saved_config.setdefault("init", None)  # and before --init
        saved_config.setdefault("action_dropout", 0.0)  # and before --action-dropout
        saved_config.setdefault("keyframe_weight", 1.0)  # and before --keyframe-weight
        saved_config["model_set"] = tuple(saved_config.get("model_set", ()))  # JSON gives a list
        same_model_set = model_overrides(saved_config["model_set"]) == model_overrides(config.model_set)  # any order
        for key in ("task", "model", "arch", "action_inputs", "random_offsets", "shift_augment", "batch_size",
                    "epochs", "memory_grad", "seed", "ema", "aux_weight", "model_set", "dropout", "learning_rate",
                    "weight_decay", "warmup_steps", "decay", "grad_clip", "action_dropout", "keyframe_weight"):
            if key == "model_set" and same_model_set:
                continue
            if str(saved_config.get(key)) != str(getattr(config, key)):
                raise SystemExit(f"error: --resume with {key}={getattr(config, key)!r}, but the run in {out} used "
                                 f"{saved_config.get(key)!r}; use the same settings or another --out")
        # the same data: by its fingerprint (then it may have moved, or be named from another folder), or, for
        # runs from before the fingerprint was kept, by its place
        same_place = Path(saved_config.get("data", "")).resolve() == Path(config.data).resolve()
        saved_data = saved_state.get("dataset")
        same_data = same_place if saved_data is None else saved_data == fingerprint
        if not same_data and not same_place:
            raise SystemExit(f"error: --resume with --data {config.data}, but the run in {out} was trained on "
                             f"{saved_config.get('data')}; use the same data or another --out")
        if not same_data:
            raise SystemExit(f"error: --resume: the dataset at {config.data} is not the one the run in {out} was "
                             f"trained on (it was collected again or changed since: {dataset.num_episodes} episodes "
                             f"now); resume with that data, or train on this one with another --out")
        saved_init = saved_config["init"]  # a path, compared as a place (relative or absolute, the same folder)
        if (saved_init is None) != (config.init is None) or (
                saved_init is not None and Path(saved_init).resolve() != Path(config.init).resolve()):
            raise SystemExit(f"error: --resume with --init {config.init}, but the run in {out} started from "
                             f"{saved_init}; use the same settings or another --out")
        saved = load_checkpoint(last, task=task.name, mode=model_config.mode)
        model.load_state_dict(saved.state_dict())
        start_epoch, step, trained = load_training_state(last, optimizer, scheduler, average)
        started_at -= trained  # --max-minutes and the time-decayed learning rate count every sitting
        if main_process:
            print(f"resuming {out} after epoch {start_epoch}")
    elif config.resume and last.exists():
        raise SystemExit(f"error: --resume: {last} holds no training state ({STATE_JSON} is missing), so the run "
                         f"cannot go on from it; delete {out} to start over, or give another --out")
    elif config.resume and main_process:
        print(f"nothing to resume in {out}; starting fresh")
    elif (out / "log.jsonl").exists() or last.exists():
        raise SystemExit(f"error: {out} already holds a run; continue it with --resume, or give another --out "
                         f"(or delete the folder to start over)")
    runner = SegmentLosses(model)
    if config.compile:
        runner = torch.compile(runner)
    if world > 1:
        # detached memory: the MRV's output only reaches the next segment through a detached state, so its
        # parameters get no gradient in a step, which DDP must be told to expect
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=config.memory_grad == "detached")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    warning = bf16_warning(config, device, cpu_has_bf16()) if main_process else None
    if warning:
        print(warning, file=sys.stderr)
    if main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SystemExit(f"error: --out {out}: cannot make the folder ({error})") from None
    log = open(out / "log.jsonl", "a", buffering=1) if main_process else None  # whole lines even after a kill
    say = print if main_process else (lambda *a, **k: None)
    say(f"training {task.name}/{config.model} on {device}: {len(samples)} samples of {sample_len} steps"
        + (" (random offsets: more or fewer per epoch)" if config.random_offsets else "") + ", "
          f"{model.num_parameters():,} parameters, {config.epochs} epochs, memory_grad={config.memory_grad}"
        + (f", {world} processes" if world > 1 else ""))

    curves_label = metric_label(task.name)
    stopped = False
    loss = float("nan")
    for epoch in range(start_epoch, config.epochs):
        samples = epoch_samples[epoch]
        batches_per_epoch = math.ceil(len(samples) / config.batch_size)
        # seeded by (seed, epoch), not seed + epoch: runs of neighbouring seeds must not share batch orders
        order = np.random.default_rng([config.seed, epoch, 0]).permutation(len(samples))
        started = time.perf_counter()
        bar = tqdm(range(batches_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not main_process)
        for b in bar:
            index = samples[order[b * config.batch_size:(b + 1) * config.batch_size]]
            if len(index) < world:  # a last global batch too small to give every process a sample
                continue
            if time_limit is not None:
                clock["elapsed"] = shared_elapsed(started_at, device, world)
                if clock["elapsed"] > time_limit:
                    stopped = True
                    say(f"stopped at the --max-minutes limit ({config.max_minutes} min) in epoch {epoch + 1}, "
                        f"after {step} optimiser steps")
                    break
            rtg, obs, actions, targets, *aux = make_batch(dataset, index[rank::world], sample_len, device,
                                                          aux=bool(config.aux_weight))
            if config.shift_augment:
                offsets = shift_offsets(config.shift_augment, len(index), config.seed, epoch, b)
                obs = shift_frames(obs, offsets[rank::world])
            weights = keyframe_weights(actions, targets, config.keyframe_weight)  # from the actions as taken
            if config.action_dropout:
                actions = drop_actions(actions, config.action_dropout, config.seed, epoch, b, len(index),
                                       slice(rank, None, world))
            lr = scheduler.get_last_lr()[0]  # the rate of this batch's (first) update, logged beside its loss
            with autocast:
                losses = train_step(model, optimizer, rtg, obs, actions, targets=targets,
                                    memory_grad=config.memory_grad,
                                    grad_clip=config.grad_clip, scheduler=scheduler,
                                    micro_batch=config.micro_batch or None, runner=runner,
                                    aux_targets=aux[0] if aux else None, aux_weight=config.aux_weight,
                                    weights=weights, on_update=average.update if average is not None else None)
            step += steps_per_batch
            loss = float(np.mean(losses)) if losses else float("nan")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if main_process:
                log.write(json.dumps({"epoch": epoch + 1, "step": step, "loss": loss, "segment_losses": losses,
                                      "lr": lr}) + "\n")
        if stopped:  # a partial epoch: `last` keeps the last whole one, for --resume
            if main_process:
                log.write(json.dumps({"epoch": epoch + 1, "step": step, "stopped": "max_minutes"}) + "\n")
            break
        record = {"epoch": epoch + 1, "step": step, "epoch_seconds": round(time.perf_counter() - started, 1)}
        if main_process and val_dataset is not None:
            with averaged():
                record["val_loss"], aux_accuracy = held_out_scores(model, val_dataset, val_index, sample_len, device,
                                                                   autocast)
            print(f"epoch {epoch + 1}: held-out loss {record['val_loss']:.4f}, the mean over the steps of "
                  f"{len(val_index)} windows (last batch's training loss {loss:.4f}, the mean of its segments' means)")
            if aux_accuracy is not None:
                record["val_aux_accuracy"] = aux_accuracy
                print(f"epoch {epoch + 1}: held-out {task.aux_label} read by the auxiliary head, per segment: "
                      + ", ".join(f"{a:.3f}" for a in record["val_aux_accuracy"]))
        if main_process and config.eval_every and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            values = task.train.eval_values or task.evaluation.values[:2]
            rng_state = torch.get_rng_state()  # evaluation must not change the training's random stream
            with averaged():
                results = evaluate(model, task, values, config.eval_episodes, seed=10_000, show_progress=False)
            torch.set_rng_state(rng_state)
            key = result_key(task.evaluation.metric)
            record["eval"] = {str(r[task.evaluation.setting]): r[key] for r in results}
            print(f"epoch {epoch + 1}: evaluation {task.evaluation.metric} {record['eval']}")
        if main_process:
            log.write(json.dumps(record) + "\n")
            model.training_info["epochs_done"] = epoch + 1
            save_checkpoint(model, last, replace_others=True, extra=lambda folder: save_training_state(
                folder, optimizer, scheduler, epoch + 1, step, config, average, time.monotonic() - started_at,
                fingerprint))
            if config.curves:  # after the checkpoint: a kill while drawing loses no epoch
                draw_curves(out, curves_label)
        if world > 1:
            dist.barrier()  # the others wait for the checkpoint (and evaluation) of process 0
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    final = out / "model"
    if stopped:
        model.training_info["stopped"] = f"max_minutes={config.max_minutes} after {step} optimiser steps"
    if main_process:
        log.close()
        if average is not None:
            model.load_state_dict(average.average)  # the finished model is the average
        save_checkpoint(model, final, replace_others=True)
        print(f"wrote {final}")
    if world > 1:
        dist.barrier()
    return final


def main(config: TrainConfig) -> None:
    try:
        train(config)
    except (DatasetError, CheckpointError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    except KeyError as error:  # an unknown task; its message without KeyError's quotes
        raise SystemExit(f"error: {error.args[0]}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, cli(TrainConfig), "interrupted: the last complete epoch (if one was) is in the run's last/ "
             "folder; continue with the same command and --resume")
