"""Training-step speed and peak memory for the T-Maze paper configs (the paper's hyperparameter tables).

    python -m training.bench_train                # RATE at batch 128 (3 x 50 steps), DT at batch 64 (150 steps)
    python -m training.bench_train --steps 1 --rate-batch 8 --dt-batch 8   # a quick look
    python -m training.bench_train --compile      # as train --compile; the warm-up column shows its cost

Each case runs in a fresh process so that its peak memory is its own. Tokens are trajectory tokens
(3 per step: return-to-go, observation, action); memory tokens are not counted.
"""

import dataclasses
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from training.cli import AtLeast, cli, device_or_exit, run_main

REFERENCE_RATE_TOKENS_PER_S = 1800  # a reference implementation, RATE batch 128, this kind of 2-core machine


@dataclass
class Args:
    """Measure tokens/s and peak memory of one training step of the T-Maze paper configs."""

    steps: Annotated[int, AtLeast(1)] = 3
    """timed training steps per case (after one warm-up step)"""
    rate_batch: Annotated[int, AtLeast(1)] = 128
    """batch size of the RATE case (samples of 3 segments x 50 steps)"""
    dt_batch: Annotated[int, AtLeast(1)] = 64
    """batch size of the DT case (samples of one 150-step window)"""
    memory_grad: Literal["bptt", "detached"] = "bptt"
    """bptt (default training) or detached (the reference scheme)"""
    micro_batch: Annotated[int, AtLeast(0)] = 32
    """samples per forward/backward; gradients accumulate to one update of the whole batch (0: whole batch)"""
    activation_checkpointing: bool = False
    """recompute each layer in backward instead of keeping its activations (less memory, slower)"""
    device: str = "auto"
    """cpu, cuda or auto (cuda when available)"""
    compile: bool = False
    """torch.compile the losses, as train --compile (the warm-up step then includes the compilation)"""
    bf16: bool = False
    """bfloat16 autocast of the forward pass, as train --bf16"""
    threads: Annotated[int, AtLeast(0)] = 0
    """torch CPU threads in each case's process (0: torch's default, one per core); on a shared machine,
    1 keeps a burst of other load from slowing a step many times over"""


def inplace_baddbmm_flop(self_shape, batch1_shape, batch2_shape, *args, out_shape=None, **kwargs) -> int:
    """Multiply-add work of the in-place `baddbmm_` (the attention backward accumulates with it), which
    torch's counter leaves out: 2 * b * m * k * n, as for `baddbmm`."""
    batch, rows, inner = batch1_shape
    return 2 * batch * rows * inner * batch2_shape[-1]


def _run_case(mode: str, batch: int, args: Args, queue) -> None:
    from rate_core.model import MemoryTransformer
    from rate_core.paper import paper_config
    from training.step import SegmentLosses, train_step

    device = torch.device(args.device)  # resolved by main
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = paper_config("tmaze", mode)
    model = MemoryTransformer(config).to(device)
    model.activation_checkpointing = args.activation_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    steps = config.context_length * config.sections
    rtg = torch.ones(batch, steps, device=device)
    obs = torch.randn(batch, steps, *config.obs_shape, device=device)
    actions = torch.randint(0, config.act_dim, (batch, steps), device=device)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB)
    runner = torch.compile(SegmentLosses(model)) if args.compile else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with autocast:
            train_step(model, optimizer, rtg, obs, actions, memory_grad=args.memory_grad,
                       micro_batch=args.micro_batch or None, runner=runner)

    start = time.perf_counter()
    step()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # Matrix-multiply work of one step, counted on 2 samples and scaled (it is linear in the batch).
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: inplace_baddbmm_flop}) as counter:
        train_step(model, optimizer, rtg[:2], obs[:2], actions[:2], memory_grad=args.memory_grad)
    flops = counter.get_total_flops() * batch / 2
    queue.put(dict(mode=mode, batch=batch, device=str(device), seconds=seconds, warmup=warmup,
                   tokens_per_s=3 * steps * batch / seconds, peak_gib=peak, baseline_gib=baseline_rss,
                   gflop=flops / 1e9, parameters=model.num_parameters()))


def matmul_peak_gflops(device: str) -> float:
    """Measured float32 throughput of a large square matrix multiply: a ceiling for this model."""
    a = torch.randn(1024, 1024, device=device)
    a @ a
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return 10 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def measure(mode: str, batch: int, args: Args) -> dict:
    """Run one case in a fresh process; returns its measurements."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_case, args=(mode, batch, args, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        likely = "; killed: out of memory?" if process.exitcode == -9 else "; its error is above"
        raise RuntimeError(f"{mode} at batch {batch} failed (exit code {process.exitcode}{likely})")
    return queue.get()


def main(args: Args) -> None:
    args = dataclasses.replace(args, device=device_or_exit(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, memory_grad={args.memory_grad}, "
          f"micro_batch={args.micro_batch or 'whole batch'}, activation_checkpointing={args.activation_checkpointing}, "
          f"compile={args.compile}, bf16={args.bf16}")
    results = []
    for mode, batch in (("rate", args.rate_batch), ("dt", args.dt_batch)):
        print(f"measuring {mode} at batch {batch} ...", flush=True)
        results.append(measure(mode, batch, args))
    peak = matmul_peak_gflops(results[0]["device"])
    print(f"\n{'mode':<5} {'batch':>5} {'device':<6} {'warm-up s':>9} {'s/step':>7} {'tokens/s':>9} {'peak GiB':>9} "
          f"{'GFLOP/step':>10} {'GFLOP/s':>8}")
    for r in results:
        print(f"{r['mode']:<5} {r['batch']:>5} {r['device']:<6} {r['warmup']:>9.2f} {r['seconds']:>7.2f} "
              f"{r['tokens_per_s']:>9,.0f} {r['peak_gib']:>9.2f} {r['gflop']:>10,.0f} "
              f"{r['gflop'] / r['seconds']:>8.1f}")
    rate = results[0]
    ceiling = rate["tokens_per_s"] * peak / (rate["gflop"] / rate["seconds"])
    print(f"\nmatrix-multiply peak of this device: {peak:.0f} GFLOP/s (float32, 1024 x 1024); at that rate the "
          f"RATE step's matrix multiplies alone would allow {ceiling:,.0f} tokens/s")
    if rate["device"] == "cpu" and args.rate_batch == 128 and args.memory_grad == "bptt":  # the figure's setting
        print(f"RATE vs a reference implementation's ~{REFERENCE_RATE_TOKENS_PER_S:,} tokens/s, a figure recorded at "
              f"batch 128 on this kind of 2-core CPU (not measured in this run): "
              f"{rate['tokens_per_s'] / REFERENCE_RATE_TOKENS_PER_S:.1f}x")
    print("peak memory: " + ("CUDA max_memory_allocated" if rate["device"].startswith("cuda") else
                             f"process peak RSS (the interpreter and torch alone take {rate['baseline_gib']:.2f} GiB)"))


if __name__ == "__main__":
    run_main(main, cli(Args))
