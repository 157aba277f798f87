"""Benchmark the rollout engine against recompute-everything loops, in one run.

    python -m training.bench_rollout                      # shipped T-Maze RATE, T = 900, 100 envs
    python -m training.bench_rollout --device cuda

Three ways to play the same seeded episodes:
  engine            rate_core.rollout.run_episodes: all envs in lockstep, cached incremental inference
  reference         one env at a time, recomputing the current segment at every step (how the
                    reference code evaluates), memory updated by a full pass at each segment end
  batched recompute all envs in lockstep, recomputing the current segment at every step

The recompute loops are slow, so by default they play fewer envs or steps (whole segments, so the
mean cost per step is that of a full episode); the rates are env-steps per second either way.
The last line reads `speedup_vs_reference=<x> speedup_vs_batched_recompute=<y>`.
"""

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from tqdm import tqdm

from rate_core.checkpoint import CheckpointError, load_checkpoint
from rate_core.model import ACTION_PAD
from rate_core.rollout import make_policy, run_episodes
from rate_core.tasks import get_task
from training.cli import AtLeast, check_env_settings, cli, device_or_exit, run_main


@dataclass
class Args:
    """Measure env-steps/s of the engine and of two recompute loops on one checkpoint."""

    checkpoint: Path = Path("assets/checkpoints/tmaze/rate")
    """a segment-recurrent checkpoint (rate, rmt or trxl) of T-Maze, whose batched env the loops share"""
    length: int = 900
    """T-Maze episode length"""
    envs: Annotated[int, AtLeast(1)] = 100
    """environments in lockstep"""
    reference_envs: Annotated[int, AtLeast(1)] = 3
    """episodes the one-env-at-a-time reference plays (whole episodes; at most --envs)"""
    recompute_steps: Annotated[int, AtLeast(0)] = 300
    """steps the batched recompute loop plays (rounded to whole segments; 0: the whole episode)"""
    device: str = "auto"
    """cpu, cuda or auto"""
    seed: Annotated[int, AtLeast(0)] = 0
    """first environment seed"""
    rounds: Annotated[int, AtLeast(1)] = 3
    """rounds of the three loops, one after another in each, so that a burst of load on a shared machine
    hits one round's ratios, not one loop; the speedups are the medians of the rounds' ratios"""
    threads: Annotated[int, AtLeast(0)] = 0
    """torch CPU threads (0: torch's default)"""


@torch.no_grad()
def recompute_rollout(model, vector_env, seeds, target_return: float, max_steps: int | None, desc: str):
    """Argmax episodes that recompute the current segment at every step. Returns actions (B, T)."""
    device = next(model.parameters()).device
    obs, _ = vector_env.reset(seed=list(seeds))
    num, k = vector_env.num_envs, model.config.segment_steps
    rtg = torch.full((num,), float(target_return), device=device)
    state, seg_rtg, seg_obs, seg_act, taken = model.initial_state(num), [], [], [], []
    done = np.zeros(num, dtype=bool)
    steps = max_steps or vector_env.episode_length
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False):
        seg_rtg.append(rtg)
        seg_obs.append(torch.as_tensor(obs, device=device))
        seg_act.append(torch.full((num,), ACTION_PAD, dtype=torch.long, device=device))
        logits = model(torch.stack(seg_rtg, 1), torch.stack(seg_obs, 1), torch.stack(seg_act, 1), state)[0][:, -1]
        action = logits.argmax(-1)
        seg_act[-1] = action
        taken.append(action.cpu().numpy())
        if len(seg_act) == k:
            _, state = model(torch.stack(seg_rtg, 1), torch.stack(seg_obs, 1), torch.stack(seg_act, 1), state)
            seg_rtg, seg_obs, seg_act = [], [], []
        obs, reward, terminated, truncated, _ = vector_env.step(action.cpu().numpy())
        rtg = rtg - torch.as_tensor(reward, device=device, dtype=torch.float32)
        done |= terminated | truncated
        if done.all():
            break
    return np.stack(taken, 1)


@torch.no_grad()
def segment_latency(model, task, settings, envs: int, device, segments: int = 2):
    """Mean seconds of one batched model step (the action logits) by position in the segment, and
    of the memory update at the end of a segment, over `segments` segments."""
    with contextlib.closing(task.make_vector_env(envs, **settings)) as env:
        return _segment_latency(model, env, envs, device, segments)


def _segment_latency(model, env, envs: int, device, segments: int):
    obs, _ = env.reset(seed=list(range(envs)))
    policy = make_policy(model, envs)
    k = model.config.segment_steps
    rtg = torch.ones(envs, device=device)
    times, updates = np.zeros((segments, k)), np.zeros(segments)

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for s in range(segments):
        for i in range(k):
            start = clock()
            action = policy.logits(rtg, torch.as_tensor(obs, device=device)).argmax(-1)
            middle = clock()
            policy.record_action(action)
            times[s, i] = middle - start
            if i == k - 1:
                updates[s] = clock() - middle
            obs, *_ = env.step(action.cpu().numpy())
    return times.mean(0), updates.mean()


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(device_or_exit(args.device))
    if args.reference_envs > args.envs:
        raise SystemExit(f"error: --reference-envs ({args.reference_envs}) plays the first of the --envs "
                         f"({args.envs}) episodes: give at most {args.envs}")
    try:
        model = load_checkpoint(args.checkpoint, device=device).eval()
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    if model.config.mode == "dt":
        raise SystemExit("error: the benchmark compares cached segment-recurrent inference; give a rate, rmt or "
                         "trxl checkpoint")
    if model.task != "tmaze":
        raise SystemExit(f"error: {args.checkpoint} is a {model.task} checkpoint; the benchmark plays T-Maze (its "
                         f"episodes have one fixed length, which the recompute loops rely on): give a T-Maze "
                         f"rate, rmt or trxl checkpoint")
    task = get_task(model.task)
    settings = {**task.default_settings, task.evaluation.setting: args.length}
    check_env_settings(task, [settings], "--length")
    target = task.evaluation.target_return
    seeds = list(range(args.seed, args.seed + args.envs))
    k = model.config.segment_steps
    print(f"{args.checkpoint} ({task.name}, {model.config.mode}, K={k}) on {device}, "
          f"{torch.get_num_threads()} threads; {task.evaluation.setting}={args.length}, {args.envs} envs")

    # Every vector env made here is closed once the loops are done (not left to garbage collection).
    with contextlib.ExitStack() as made:
        def make_env(num_envs: int):
            return made.enter_context(contextlib.closing(task.make_vector_env(num_envs, **settings)))

        # warm-up (allocator, kernels)
        run_episodes(model, make_env(args.envs), seeds, target, max_steps=k + 2)

        steps = args.recompute_steps and max(k, args.recompute_steps // k * k)
        engine_steps = engine_seconds = ref_steps = ref_seconds = batched_steps = batched_seconds = 0
        ref_actions, ratios = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            engine = run_episodes(model, make_env(args.envs), seeds, target, trace=False, progress=None)
            e_seconds, e_steps = time.perf_counter() - start, int(engine.lengths.sum())

            start = time.perf_counter()
            r_steps, r_actions = 0, []
            for seed in seeds[: args.reference_envs]:
                actions = recompute_rollout(model, make_env(1), [seed], target, None, desc=f"reference seed {seed}")
                r_steps += actions.shape[1]
                r_actions.append(actions[0])
            r_seconds = time.perf_counter() - start

            start = time.perf_counter()
            batched_actions = recompute_rollout(model, make_env(args.envs), seeds, target,
                                                steps or None, desc="batched recompute")
            b_seconds = time.perf_counter() - start
            ratios.append((e_steps / e_seconds / (r_steps / r_seconds),
                           e_steps / e_seconds / (batched_actions.size / b_seconds)))
            engine_steps, engine_seconds = engine_steps + e_steps, engine_seconds + e_seconds
            ref_steps, ref_seconds, ref_actions = ref_steps + r_steps, ref_seconds + r_seconds, r_actions
            batched_steps, batched_seconds = batched_steps + batched_actions.size, batched_seconds + b_seconds
        engine_rate, ref_rate, batched_rate = (engine_steps / engine_seconds, ref_steps / ref_seconds,
                                               batched_steps / batched_seconds)

        # The three loops must agree on what they did (argmax; reference envs are the first ones).
        check = run_episodes(model, make_env(args.envs), seeds, target, trace=True)
        agree = all(np.array_equal(check.traces[i].actions, a) for i, a in enumerate(ref_actions)) and all(
            np.array_equal(check.traces[i].actions[: batched_actions.shape[1]], batched_actions[i])
            for i in range(args.envs))

    latency, update = segment_latency(model, task, settings, args.envs, device)
    each = f" in each of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"{'loop':<20} {'env-steps':>10} {'seconds':>9} {'env-steps/s':>12}   (all rounds together)")
    print(f"{'engine':<20} {engine_steps:>10} {engine_seconds:>9.2f} {engine_rate:>12.1f}")
    print(f"{'reference':<20} {ref_steps:>10} {ref_seconds:>9.2f} {ref_rate:>12.1f}   "
          f"({args.reference_envs} envs, one at a time{each})")
    print(f"{'batched recompute':<20} {batched_steps:>10} {batched_seconds:>9.2f} {batched_rate:>12.1f}   "
          f"({batched_actions.shape[1]} steps of {args.envs} envs{each})")
    print(f"actions of the three loops agree: {agree}")
    print(f"model step latency with {args.envs} envs: segment start {latency[0] * 1e3:.2f} ms, "
          f"middle {latency[k // 2] * 1e3:.2f} ms, end {latency[-1] * 1e3:.2f} ms; memory update after the segment "
          f"{update * 1e3:.2f} ms (once per {k} steps)")
    print(f"success rate of the engine's episodes: {engine.successes.mean():.2f}")
    print("per-round speedups (reference, batched recompute): "
          + ", ".join(f"{a:.1f} / {b:.1f}" for a, b in ratios))
    print(f"speedup_vs_reference={np.median([a for a, _ in ratios]):.1f} "
          f"speedup_vs_batched_recompute={np.median([b for _, b in ratios]):.1f}")


if __name__ == "__main__":
    run_main(main, cli(Args))
