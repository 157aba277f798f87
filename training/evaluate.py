"""Evaluate a checkpoint with its task's protocol (rate_core.tasks), batched over episodes.

    python -m training.evaluate --checkpoint assets/checkpoints/tmaze/rate
    python -m training.evaluate --checkpoint runs/tmaze/rate/model --lengths 150 900 --episodes 50 --json out.json
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro
from tqdm import tqdm

from rate_core.checkpoint import CheckpointError
from rate_core.hub import is_hub_reference, load_reference
from rate_core.rollout import EpisodeBatch, check_pixel_noise, make_policy, run_episodes
from rate_core.tasks import Task, available_memory_gb, get_task
from training.cli import (OWN_DEFAULT, at_least, check_env_settings, cli, device_or_exit, run_main,
                          writable_file_or_exit)
from training.collect import parse_settings
from training.dataset import DatasetError, load_dataset


@dataclass
class Args:
    """Score a checkpoint on its task: success rate or mean return per setting, as a table and JSON."""

    checkpoint: str
    """checkpoint folder (config.json + model.safetensors) or hf://USER/NAME"""
    values: Annotated[tuple[int, ...] | None, tyro.conf.arg(aliases=("--lengths", "--sizes")), OWN_DEFAULT] = None
    """values of the task's evaluation setting to test (T-Maze episode lengths, Minigrid grid sizes; default:
    the protocol's)"""
    step_cap: int | None = None
    """override the episode step cap of tasks that have one (Minigrid 500, ViZDoom 2100)"""
    settings: Annotated[tuple[str, ...], OWN_DEFAULT] = ()
    """other environment settings as NAME=INT (e.g. cue=1: ViZDoom-Two-Colors' oracle cue)"""
    target_return: float | Literal["top-decile"] | None = None
    """override the protocol's target return: a number, or top-decile (the 90th percentile of the episode
    returns of the dataset in --data)"""
    data: Annotated[Path | None, OWN_DEFAULT] = None
    """dataset for --target-return top-decile (default: data/<task>/expert)"""
    episodes: Annotated[int | None, OWN_DEFAULT] = None
    """episodes per setting (default: the protocol's)"""
    actions: Literal["protocol", "sampled", "argmax"] = "protocol"
    """how the agent picks its action: as the protocol says (T-Maze argmax, the others sampled), sampled
    from the softmax, or the most likely one"""
    temperature: float = 1.0
    """sampled actions are drawn from softmax(logits / temperature): below 1 nearer the argmax, above 1
    more random (recorded in the JSON's protocol)"""
    memory_horizon: Annotated[int | None, OWN_DEFAULT] = None
    """carry memory and cache over at most this many segments, the current one included: at every segment
    boundary they are rebuilt from the last H - 1 segments, as if the episode had started there (default:
    the whole episode, as the protocol; rate, rmt and trxl only). Shows how far back a model's memory reaches"""
    hide_actions: float = 0.0
    """feed each chosen action back to the model as the unknown-action token with this probability (as train
    --action-dropout hides them in training; the env still takes the action). Default 0: every action shown,
    as the protocol"""
    pixel_noise: float = 0.0
    """image tasks: move each value of each frame the model sees one level up or down with this probability
    (drawn per episode; the env plays on unchanged). Shows how much a score rests on frames exactly as the
    data's, as another renderer's (a GPU's EGL) differ by a level here and there. Default 0, as the protocol"""
    max_envs: Annotated[int | None, OWN_DEFAULT] = None
    """at most this many envs at once, more episodes in consecutive batches (default: the protocol's: all of
    them, Memory Maze 10, which peaks near 5 GB of memory on a CPU host; fewer where the memory available
    cannot hold them, with a warning). Fewer take less memory, not other results: each episode's action draws
    are seeded by its own seed"""
    seed: int = 0
    """first seed; seeds are balanced between the two values of the protocol's balance key"""
    json: Annotated[Path | None, OWN_DEFAULT] = None
    """write the results here (default: eval.json next to the checkpoint's files, for the protocol's
    evaluation only: any other needs --json), once every setting is done; until then the results so far
    are in NAME.partial.json beside it, which an interrupted evaluation leaves"""
    device: str = "auto"
    """cpu, cuda or auto"""


def balanced_seeds(task: Task, settings: dict, count: int, first: int) -> list[int]:
    """`count` seeds from `first` upwards, half of them for each of the two values of the protocol's
    balance key (e.g. the cue side), read from the info of a reset of one env."""
    key = task.evaluation.balance_key
    if key is None:
        return list(range(first, first + count))
    groups: dict = {}
    env = task.make_env(**settings)
    try:
        seed = first
        while True:
            _, info = env.reset(seed=seed)
            groups.setdefault(np.asarray(info[key]).item(), []).append(seed)
            if len(groups) > 2:
                raise ValueError(f"balance key {key!r} of task {task.name!r} has more than two values")
            if len(groups) == 2:
                low, high = (groups[v] for v in sorted(groups))
                if len(low) >= count - count // 2 and len(high) >= count // 2:
                    return sorted(low[: count - count // 2] + high[: count // 2])
            if seed - first > 100 * count + 100:
                raise ValueError(f"could not balance {count} seeds between two values of {key!r} for {task.name}")
            seed += 1
    finally:
        env.close()


def batch_that_fits(task: Task, wanted: int) -> int:
    """`wanted` envs at once, or fewer where the memory available now cannot hold them
    (Task.envs_that_fit), saying so on stderr. The results do not depend on the batch."""
    if not task.env_memory_need_gb(wanted):  # envs too light to count: no need to ask the system
        return wanted
    available_gb = available_memory_gb()
    fits = task.envs_that_fit(wanted, available_gb)
    if fits < wanted:
        print(f"warning: {wanted} {task.title} envs at once would hold about {task.env_memory_need_gb(wanted):.0f} GB "
              f"and {available_gb:.0f} GB is available: running {fits} at a time (the results do not depend on "
              f"it; --max-envs sets the number)", file=sys.stderr)
    return fits


def evaluate(model, task: Task, values, episodes: int, seed: int, sample: bool | None = None,
             show_progress: bool = True, on_result=None, overrides: dict | None = None,
             target_return: float | None = None, temperature: float | None = None,
             memory_horizon: int | None = None, max_envs: int | None = None,
             hide_actions: float = 0.0, pixel_noise: float = 0.0) -> list[dict]:
    """Run the protocol at each value of its setting; one dict of results per value.
    on_result: optional callable(results so far), called after each value (e.g. to save them);
    overrides: environment settings that replace the task's defaults (e.g. step_cap);
    memory_horizon: see rate_core.rollout.SegmentRecurrentPolicy; max_envs: envs at once (default: the
    protocol's max_envs); hide_actions, pixel_noise: see rate_core.rollout.run_episodes."""
    protocol = task.evaluation
    temperature = protocol.temperature if temperature is None else temperature
    sample = protocol.sample_actions if sample is None else sample
    target = protocol.target_return if target_return is None else target_return
    results = []
    for value in values:
        settings = {**task.default_settings, **(overrides or {}), protocol.setting: value}
        seeds = balanced_seeds(task, settings, episodes, seed)
        started = time.perf_counter()
        batch = batch_that_fits(task, min(max_envs or protocol.max_envs or episodes, episodes))
        parts, env = [], None
        try:
            for start in range(0, episodes, batch):
                chunk = seeds[start:start + batch]
                if env is None or env.num_envs != len(chunk):  # the same envs play the next chunk's seeds
                    if env is not None:
                        env.close()  # closing again (finally, if the next make fails) does nothing
                    env = task.make_vector_env(len(chunk), **settings)
                desc = f"{protocol.setting}={value}"
                if batch < episodes:
                    desc += f" episodes {start + 1}-{start + len(chunk)}"
                with tqdm(desc=desc, unit="step", disable=not show_progress, leave=False) as bar:
                    parts.append(run_episodes(model, env, chunk, target, sample=sample, sample_seed=seed,
                                              progress=lambda _: bar.update(), temperature=temperature,
                                              memory_horizon=memory_horizon, hide_actions=hide_actions,
                                              pixel_noise=pixel_noise))
        finally:
            if env is not None:
                env.close()
        outcome = parts[0] if len(parts) == 1 else EpisodeBatch(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in ("returns", "lengths", "successes")),
            reset_info={k: np.concatenate([p.reset_info[k] for p in parts]) for k in parts[0].reset_info})
        result = {
            protocol.setting: value, "episodes": episodes, **summarize(outcome.returns, outcome.successes),
            "mean_length": float(outcome.lengths.mean()), "seconds": round(time.perf_counter() - started, 2),
            # per episode, in seed order: what training.compare pairs two checkpoints on
            "seeds": [int(s) for s in seeds], "returns": [round(float(r), 4) for r in outcome.returns],
        }
        if protocol.balance_key and protocol.balance_key in outcome.reset_info:
            names = dict(protocol.group_names)
            keys = outcome.reset_info[protocol.balance_key]
            result["groups"] = {
                str(names.get(v, v)): {"episodes": int((keys == v).sum()),
                                       **summarize(outcome.returns[keys == v], outcome.successes[keys == v])}
                for v in sorted(np.unique(keys).tolist(), key=lambda v: list(names).index(v) if v in names else 99)}
            if len(result["groups"]) == 2:
                first, second = result["groups"].values()
                result["imbalance"] = abs(first["mean_return"] - second["mean_return"])
        results.append(result)
        if on_result is not None:
            on_result(results)
    return results


def values_and_overrides(task: Task, values, step_cap: int | None) -> tuple[tuple, dict]:
    """The values of the protocol's setting to run and the env settings to override, from the
    command line's --values and --step-cap. Where the step cap is the protocol's setting
    (ViZDoom), --step-cap is the value to run."""
    protocol = task.evaluation
    repeated = sorted({value for value in values or () if list(values).count(value) > 1})
    if repeated:
        raise ValueError(f"--values: {', '.join(map(str, repeated))} given more than once; give each value once")
    if step_cap is None:
        return tuple(values or protocol.values), {}
    if "step_cap" not in task.default_settings:
        raise ValueError(f"task {task.name} has no step cap setting")
    if protocol.setting == "step_cap":
        if values:
            raise ValueError(f"the step cap is {task.name}'s evaluation setting: give --values or --step-cap, not both")
        return (step_cap,), {}
    return tuple(values or protocol.values), {"step_cap": step_cap}


def protocol_changed(args: Args, task: Task) -> list[str]:
    """The options of `args` that make the evaluation another than `task`'s protocol (whose results the
    checkpoint's own eval.json keeps); --max-envs and --device change no result."""
    default = Args(checkpoint=args.checkpoint)
    protocols = {"values": tuple(task.evaluation.values), "episodes": task.evaluation.episodes,  # given, but the same
                 "actions": "sampled" if task.evaluation.sample_actions else "argmax"}
    return [f"--{name.replace('_', '-')}" for name in ("values", "step_cap", "settings", "target_return", "episodes",
                                                      "actions", "temperature", "memory_horizon", "hide_actions",
                                                      "pixel_noise", "seed")
            if getattr(args, name) not in (getattr(default, name), protocols.get(name, getattr(default, name)))]


def not_the_protocol(evaluation: dict, task: Task) -> list[str]:
    """What makes an evaluation JSON's run another than `task`'s protocol (empty: the protocol's);
    max_envs changes no result."""
    expected = json.loads(json.dumps(asdict(task.evaluation)))  # tuples as the JSON's lists
    ran = evaluation.get("protocol") or {}
    # a key the JSON lacks is a setting added since it was written, at its default then
    differ = [name for name in expected if name != "max_envs" and ran.get(name, expected[name]) != expected[name]]
    differ += [name for name in ("memory_horizon", "hide_actions", "pixel_noise") if evaluation.get(name)]
    differ += ["overrides"] * bool(evaluation.get("overrides")) + ["seed"] * (evaluation.get("seed", 0) != 0)
    return differ


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean (0 for a single value)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def summarize(returns: np.ndarray, successes: np.ndarray) -> dict:
    """Success rate, mean return and its standard error."""
    return {"success_rate": float(successes.mean()), "mean_return": float(returns.mean()),
            "return_sem": standard_error(returns)}


def print_table(task: Task, results: list[dict]) -> None:
    """One row per setting, and per group of episodes where the protocol has groups (success rate /
    mean return +- SEM). Success only where the task scores it (ViZDoom's and Memory Maze's envs
    report none: it would read 0.00)."""
    setting, key = task.evaluation.setting, task.evaluation.balance_key
    success = task.evaluation.metric == "success"
    print(f"{setting:>15} {'episodes':>9}" + (f" {'success':>8}" if success else "")
          + f" {'return':>16} {'length':>8} {'seconds':>8}" + (f"   per {key}" if key else ""))
    for r in results:
        ret = f"{r['mean_return']:.3f} +- {r['return_sem']:.3f}"
        groups = "  ".join(f"{name}: " + (f"{g['success_rate']:.2f} / " if success else "")
                           + f"{g['mean_return']:.2f} +- {g['return_sem']:.2f}"
                           for name, g in r.get("groups", {}).items())
        if "imbalance" in r:
            groups += f"  imbalance {r['imbalance']:.2f}"
        print(f"{r[setting]:>15} {r['episodes']:>9}" + (f" {r['success_rate']:>8.2f}" if success else "")
              + f" {ret:>16} {r['mean_length']:>8.1f} {r['seconds']:>8.1f}" + (f"   {groups}" if groups else ""))


def main(args: Args) -> None:
    device = device_or_exit(args.device)
    if args.json is None and is_hub_reference(args.checkpoint):  # before the download
        raise SystemExit("error: give --json OUT for a hf:// checkpoint (its folder is the read-only Hub cache)")
    try:
        model = load_reference(args.checkpoint, device=device)
        task = get_task(model.task)
    except CheckpointError as error:  # also a config.json that names no registered task
        raise SystemExit(f"error: {error}")
    protocol = task.evaluation
    changed = protocol_changed(args, task)
    own = Path(args.checkpoint) / "eval.json"
    out = args.json or own
    if changed and out.resolve() == own.resolve():  # left out, or named as the checkpoint's own
        raise SystemExit(f"error: this evaluation is not the protocol's ({', '.join(changed)}): give --json OUT; "
                         f"a checkpoint's own eval.json holds only the protocol's results (the app, training.scores "
                         f"and push read it as such)")
    try:
        writable_file_or_exit("--json", out)
    except SystemExit:
        if args.json is None:  # the checkpoint's own folder, which the user did not name
            raise SystemExit(f"error: cannot write eval.json in the checkpoint's folder {out.parent} (read-only?); "
                             f"give --json OUT") from None
        raise
    at_least("--seed", args.seed, 0)
    if args.episodes is not None:
        at_least("--episodes", args.episodes, 1)
    if args.step_cap is not None:
        at_least("--step-cap", args.step_cap, 1)
    try:
        values, overrides = values_and_overrides(task, args.values, args.step_cap)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    extra = parse_settings(task, args.settings)
    if {protocol.setting, "step_cap"} & extra.keys():
        raise SystemExit(f"error: give {', '.join(sorted({protocol.setting, 'step_cap'} & extra.keys()))} with "
                         "--values or --step-cap, not --settings")
    overrides = {**overrides, **extra}
    check_env_settings(task, [{**task.default_settings, **overrides, protocol.setting: v} for v in values],
                       "the settings to evaluate")
    if args.data is not None and args.target_return != "top-decile":
        raise SystemExit("error: --data is read for --target-return top-decile only (the dataset's returns); add "
                         "that, or leave --data out")
    if args.target_return == "top-decile":
        data = args.data or Path("data") / task.name / "expert"
        try:
            returns = load_dataset(data, task.name).episode_returns()
        except DatasetError as error:
            raise SystemExit(f"error: --target-return top-decile reads the dataset's returns: {error}")
        protocol = replace(protocol, target_return=round(float(np.percentile(returns, 90)), 3))
        print(f"top-decile return of {data} ({len(returns)} episodes): {protocol.target_return}")
    elif args.target_return is not None:
        if not math.isfinite(args.target_return):
            raise SystemExit(f"error: --target-return must be a finite number or top-decile, "
                             f"got {args.target_return}")
        protocol = replace(protocol, target_return=args.target_return)
    if args.actions != "protocol":
        protocol = replace(protocol, sample_actions=args.actions == "sampled")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise SystemExit(f"error: --temperature must be a finite number above 0, got {args.temperature}")
    if args.temperature != 1.0:
        if not protocol.sample_actions:
            raise SystemExit("error: --temperature changes sampled actions; this evaluation takes the argmax "
                             "(add --actions sampled)")
        protocol = replace(protocol, temperature=args.temperature)
    if not 0.0 <= args.hide_actions <= 1.0:
        raise SystemExit(f"error: --hide-actions is a probability in [0, 1], got {args.hide_actions}")
    if args.hide_actions and not model.config.action_inputs:
        raise SystemExit("error: --hide-actions: this model takes no action inputs (trained with "
                         "--no-action-inputs), so there is nothing to hide; leave it at 0")
    try:
        check_pixel_noise(model, args.pixel_noise, "--pixel-noise")
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    if args.max_envs is not None:
        if args.max_envs < 1:
            raise SystemExit(f"error: --max-envs must be at least 1, got {args.max_envs}")
        protocol = replace(protocol, max_envs=args.max_envs)
    try:
        make_policy(model, 1, memory_horizon=args.memory_horizon)
    except ValueError as error:
        raise SystemExit(f"error: --memory-horizon: {error}")
    episodes = protocol.episodes if args.episodes is None else args.episodes
    actions = "argmax" if not protocol.sample_actions else \
        "sampled" + (f" at temperature {protocol.temperature}" if protocol.temperature != 1 else "")
    print(f"evaluating {args.checkpoint} ({task.name}, {model.config.mode}) on {device}: {episodes} episodes per "
          f"{protocol.setting}, {actions} actions, target return {protocol.target_return}"
          + (f", memory horizon {args.memory_horizon} segment{'s' * (args.memory_horizon > 1)}"
             if args.memory_horizon else "")
          + (f", action inputs hidden with probability {args.hide_actions}" if args.hide_actions else "")
          + (f", pixels nudged with probability {args.pixel_noise}" if args.pixel_noise else ""))

    protocol = replace(protocol, episodes=episodes, values=tuple(values))  # as run, for what reads the JSON

    partial = partial_path(out)

    def save(results, path=partial):  # after every setting, so that an interrupted evaluation keeps what it measured
        staged = path.with_name(f".{path.name}.{os.getpid()}")
        staged.write_text(json.dumps({
            "checkpoint": str(args.checkpoint), "task": task.name, "mode": model.config.mode, "seed": args.seed,
            "protocol": asdict(protocol), "overrides": overrides, "memory_horizon": args.memory_horizon,
            "hide_actions": args.hide_actions, "pixel_noise": args.pixel_noise, "results": results,
        }, indent=2))
        os.replace(staged, path)

    results = evaluate(model, task, values, episodes, args.seed, sample=protocol.sample_actions, on_result=save,
                       overrides=overrides, target_return=protocol.target_return,
                       temperature=protocol.temperature, memory_horizon=args.memory_horizon,
                       max_envs=protocol.max_envs, hide_actions=args.hide_actions, pixel_noise=args.pixel_noise)
    save(results, out)  # complete: only now does it replace an earlier JSON (e.g. a checkpoint's eval.json)
    partial.unlink(missing_ok=True)
    print_table(task, results)
    print(f"wrote {out}")


def partial_path(out: Path) -> Path:
    """Where an evaluation keeps its results until every setting is done (out itself is written once, complete)."""
    return out.with_name(f"{out.stem}.partial{out.suffix or '.json'}")


if __name__ == "__main__":
    run_main(main, cli(Args), "interrupted: the settings evaluated before are in the .partial.json beside the "
             "JSON, which is unchanged")
