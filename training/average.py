"""Average the weights of checkpoints of one model (a "model soup"), e.g. fine-tunings from one start.

    python -m training.average runs/memory_maze/ft_adrop/model runs/memory_maze/ft_adrop_s1/model \
        --out runs/memory_maze/soup

Every checkpoint must have the same task and model config. Floating-point tensors are averaged
(uniformly, or by --weights); any other tensor must be equal in all of them. The averaged model's
config.json records its sources under training.average_of. Averaging only makes sense for models
that share a start (fine-tunings of one checkpoint): two runs trained from different random
initialisations do not line up unit by unit, and their average is a broken model.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

from rate_core.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config, save_checkpoint
from rate_core.model import MemoryTransformer
from training.cli import OWN_DEFAULT, cli, folder_out_or_exit, run_main


@dataclass
class Args:
    """Average the weights of checkpoints that share a task and model config; write a new checkpoint."""

    sources: Annotated[tyro.conf.Positional[tuple[Path, ...]], OWN_DEFAULT]
    """checkpoint folders (config.json + model.safetensors), at least two"""
    out: Path
    """the averaged checkpoint's folder (an older checkpoint there is replaced; a folder holding anything
    else is refused; it may not be one of the sources)"""
    weights: Annotated[tuple[float, ...] | None, OWN_DEFAULT] = None
    """one non-negative weight per source, normalised to sum to 1 (default: equal weights)"""


def average_checkpoints(sources: list[Path], weights: list[float] | None = None) -> MemoryTransformer:
    """The model whose floating-point tensors are the weighted mean of `sources`' (CheckpointError if they differ
    in task, config or a non-float tensor)."""
    if len(sources) < 2:
        raise ValueError("give at least two checkpoints to average")
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} checkpoints; give one weight per checkpoint")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights {weights}: they must be finite, non-negative and not all zero")
    total = sum(weights)
    weights = [w / total for w in weights]

    configs = [read_checkpoint_config(source) for source in sources]
    for source, config in zip(sources[1:], configs[1:], strict=True):
        if config.get("task") != configs[0].get("task"):
            raise CheckpointError(f"{source}: task {config.get('task')!r} differs from {sources[0]}'s "
                                  f"{configs[0].get('task')!r}; average checkpoints of one task")
        if config["model_config"] != configs[0]["model_config"]:
            first, this = vars(configs[0]["model_config"]), vars(config["model_config"])
            differ = sorted(key for key in first if first[key] != this.get(key))
            raise CheckpointError(f"{source}: model config differs from {sources[0]}'s in {differ}; "
                                  f"only one model's checkpoints can be averaged")

    models = [load_checkpoint(source) for source in sources]
    states = [model.state_dict() for model in models]
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            weighted = (w * state[key].double() for w, state in zip(weights, states, strict=True))
            averaged[key] = sum(weighted).to(first.dtype)
        else:
            for source, state in zip(sources[1:], states[1:], strict=True):
                if not torch.equal(state[key], first):
                    raise CheckpointError(f"{source}: tensor {key} ({first.dtype}) differs from {sources[0]}'s "
                                          f"and cannot be averaged")
            averaged[key] = first.clone()
    model = MemoryTransformer(configs[0]["model_config"], task=configs[0].get("task", ""), training={
        "average_of": [{"checkpoint": str(source), "weight": round(w, 6), **(config.get("training") or {})}
                       for source, w, config in zip(sources, weights, configs, strict=True)],
    })
    model.load_state_dict(averaged)
    return model.eval()


def main(args: Args) -> Path:
    if any(args.out.resolve() == source.resolve() for source in args.sources):
        raise SystemExit(f"error: --out {args.out} is one of the sources; write the average to a new folder")
    folder_out_or_exit("--out", args.out)
    try:
        model = average_checkpoints(list(args.sources), None if args.weights is None else list(args.weights))
        path = save_checkpoint(model, args.out)  # ValueError for a folder there that is not a checkpoint
    except (CheckpointError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    print(f"wrote the average of {len(args.sources)} checkpoints ({model.task}, {model.num_parameters():,} "
          f"parameters) to {path}")
    return path


if __name__ == "__main__":
    run_main(main, cli(Args), "interrupted: nothing written (a checkpoint is put in place only when complete)")
