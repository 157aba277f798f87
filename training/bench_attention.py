"""Benchmark the training attention kernel with and without skipping hidden keys, in one run.

    python -m training.bench_attention                     # the shipped RATE and DT of every task
    python -m training.bench_attention --checkpoints assets/checkpoints/memory_maze/rate --repeats 20
    python -m training.bench_attention --device cuda       # the same on a GPU (blocks forced on there)

For each checkpoint's configuration: the attention of one layer over one training batch, segment by
segment, with the model's own masks (read memory, the segment's causal tokens, write memory, and the
Transformer-XL cache as it grows from segment to segment; DT: one causal window), random queries,
keys and values of the model's shapes, forward and backward. Two ways, alternating so that both
see the same machine load:

  skip   relative_attention as training runs it: blocks of query rows over only the keys they see
  full   every row over every key (skip_hidden=False)

Where the blocks would skip too little to pay (`rate_core.attention.SKIP_BELOW`), a case runs as one
block and the two ways are the same computation. Training runs blocks only on the device types in
`rate_core.attention.BLOCK_DEVICES` (CPUs); `--device cuda` runs them on the GPU for this benchmark
alone, to measure whether they would pay there. The last line reads `median_speedup=<x>
blocked_cases=<n> one_block_cases=<k>`: the median of full time / skip time over the cases in blocks.
"""

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch

from rate_core import attention
from rate_core.attention import attention_blocks, relative_attention, scores_computed
from rate_core.checkpoint import CheckpointError, read_checkpoint_config
from rate_core.model import MemoryTransformer, ModelConfig
from training.cli import OWN_DEFAULT, AtLeast, cli, device_or_exit, run_main


@dataclass
class Args:
    """Time the training attention kernel with and without skipping the keys a block cannot see."""

    checkpoints: Annotated[tuple[Path, ...], OWN_DEFAULT] = tuple(Path("assets/checkpoints") / task / mode for task in
                                          ("tmaze", "minigrid_memory", "vizdoom_two_colors", "memory_maze")
                                          for mode in ("rate", "dt"))
    """checkpoint folders whose model configurations to measure (default: the shipped RATE and DT of every task)"""
    batch_size: Annotated[int, AtLeast(1)] = 32
    """training samples per batch (the shipped models' batch)"""
    repeats: Annotated[int, AtLeast(1)] = 7
    """timed repeats of each way per case (after one warm-up); the ratio is their median"""
    threads: Annotated[int, AtLeast(0)] = 0
    """torch CPU threads (0: torch's default)"""
    skip_below: Annotated[float | None, OWN_DEFAULT] = None
    """use blocks where they compute at most this share of the scores (1: wherever a key can be skipped;
    default: rate_core.attention.SKIP_BELOW, what training uses)"""
    device: str = "cpu"
    """cpu, cuda or auto (cuda when there is one); on CUDA the blocks are run for this benchmark although
    training there runs one block"""


def segment_masks(model: MemoryTransformer) -> list[torch.Tensor]:
    """The attention masks of one training sample's segments, in order (DT: its one window)."""
    c = model.config
    tokens = 3 * c.segment_steps
    masks, cache_len = [], 0
    for _ in range(1 if c.mode == "dt" else c.sections):
        masks.append(model.attention_mask(tokens, cache_len))
        cache_len = min(c.mem_len, cache_len + tokens + 2 * c.num_mem_tokens)
    return masks


def attention_inputs(config: ModelConfig, allowed: torch.Tensor, batch_size: int, generator) -> list[torch.Tensor]:
    """Random query, key, value rows, biases and position keys of one layer for a mask's shape, on its device."""
    q_len, key_len = allowed.shape
    rows, heads, width = batch_size * config.n_head, config.n_head, key_len + max(config.num_mem_tokens - 1, 0)

    def make(*shape):
        return torch.randn(*shape, generator=generator).to(allowed.device).requires_grad_()

    return [make(rows, q_len, config.d_head), make(rows, key_len, config.d_head), make(rows, key_len, config.d_head),
            make(heads, config.d_head), make(heads, config.d_head), make(heads, width, config.d_head)]


def timed(inputs, allowed, scale: float, skip_hidden: bool) -> float:
    cuda = allowed.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(allowed.device)
    start = time.perf_counter()
    relative_attention(*inputs, allowed, scale, skip_hidden=skip_hidden).sum().backward()
    if cuda:
        torch.cuda.synchronize(allowed.device)
    return time.perf_counter() - start


def main(args: Args) -> None:
    if not args.checkpoints:
        raise SystemExit("error: --checkpoints needs at least one checkpoint folder (left out: the shipped ones)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_or_exit(args.device)
    attention.BLOCK_DEVICES = (torch.device(device).type,)  # this benchmark measures the blocks wherever it runs
    if args.skip_below is not None:
        if not 0 < args.skip_below <= 1:
            raise SystemExit(f"error: --skip-below must be in (0, 1], got {args.skip_below}")
        attention.SKIP_BELOW = args.skip_below
    generator = torch.Generator().manual_seed(0)
    try:  # every configuration first: a wrong path stops the run before any timing
        configs = {path: read_checkpoint_config(path)["model_config"] for path in args.checkpoints}
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    where = (torch.cuda.get_device_name(device) if device.startswith("cuda")
             else f"torch threads: {torch.get_num_threads()}")
    print(f"{where}; batch {args.batch_size}; forward + backward of one layer")
    print(f"{'checkpoint':44} {'Q x K':>10} {'blocks':>6} {'computed':>8} {'skip ms':>8} {'full ms':>8} {'speedup':>7}")
    speedups = []
    for path, config in configs.items():
        model = MemoryTransformer(config)
        scale = config.d_head ** -0.5
        for allowed in segment_masks(model):
            allowed = allowed.to(device)
            inputs = attention_inputs(config, allowed, args.batch_size, generator)
            blocks = attention_blocks(allowed)
            computed = scores_computed(blocks)
            times = {True: [], False: []}
            for repeat in range(args.repeats + 1):
                for skip in (True, False):
                    seconds = timed(inputs, allowed, scale, skip)
                    if repeat:  # the first is a warm-up
                        times[skip].append(seconds)
            ratios = [full / skip for skip, full in zip(times[True], times[False], strict=True)]
            speedups.append((statistics.median(ratios), len(blocks)))
            q_len, key_len = allowed.shape
            print(f"{str(path):44} {f'{q_len} x {key_len}':>10} {len(blocks):>6} "
                  f"{computed / (q_len * key_len):>8.0%} {1e3 * statistics.median(times[True]):>8.1f} "
                  f"{1e3 * statistics.median(times[False]):>8.1f} {speedups[-1][0]:>6.2f}x", flush=True)
    print("computed: the share of the Q x K scores the blocks compute (one block: no key is skipped, the two ways "
          "are the same computation); speedup: full / skip, median of the repeats")
    blocked = [speedup for speedup, parts in speedups if parts > 1]
    print(f"median_speedup={statistics.median(blocked) if blocked else float('nan'):.3f} "
          f"blocked_cases={len(blocked)} one_block_cases={len(speedups) - len(blocked)}")


if __name__ == "__main__":
    run_main(main, cli(Args))
