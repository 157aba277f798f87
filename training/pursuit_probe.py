"""Where does a Memory Maze policy stop acting as its teacher does? By how long ago it saw the target.

    python -m training.pursuit_probe --checkpoint assets/checkpoints/memory_maze/rate

Every step is put in a bucket by the steps since the current target was last in view (as the
exploring expert sees: within 40 degrees of the heading, 6 cells, nothing in between; "never": not
yet in this episode). Per bucket:

1. Teacher's episodes (a held-out dataset collected with `collect --teacher`): the model acts on them
   step by step as in evaluation (cached inference, the dataset's actions fed back, its returns-to-go)
   and we count how often its most likely action is the label, and the probability it gives the label.
2. Its own episodes (sampled actions, the evaluation's target return): the noise-free expert rides
   along (its view of the episode is the model's path) and we count how often the model's action is
   the expert's, and the share of the model's time in each bucket.

A clone that follows the teacher on the teacher's states but not on its own has drifted; the bucket
says whether it lost the target's trail, or never found it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from tqdm import tqdm

from rate_core.checkpoint import CheckpointError, load_checkpoint
from rate_core.rollout import make_policy, run_episodes
from rate_core.tasks import get_task
from training.cli import AtLeast, AtMost, cli, run_main
from training.dataset import DatasetError, load_dataset

TASK = get_task("memory_maze")
BUCKETS = (("in view", 0, 0), ("1-30", 1, 30), ("31-90", 31, 90), ("91-270", 91, 270), (">270", 271, 10**9),
           ("never", -1, -1))


@dataclass
class Args:
    """Probe where a Memory Maze checkpoint follows its teacher, by steps since the target was in view."""

    checkpoint: str
    """checkpoint folder (config.json + model.safetensors)"""
    data: Path = Path("data/memory_maze/heldout")
    """held-out teacher episodes (collect --teacher --seed 2000000 ...); its seeds are replayed"""
    episodes: Annotated[int, AtLeast(1)] = 4
    """episodes the model plays"""
    steps: Annotated[int, AtLeast(1), AtMost(1000)] = 1000
    """steps of each of its episodes (the protocol's 1,000)"""
    seed: Annotated[int, AtLeast(0)] = 0
    """first seed of the model's episodes (the evaluator's are 0-29)"""
    recall: Annotated[float, AtLeast(0)] = 0.0
    """the teacher's recall (collect --teacher-options recall=M): the labels of the model's own episodes"""
    threads: Annotated[int, AtLeast(1)] = 1
    """torch threads"""


def replay(seed: int, actions: np.ndarray, recall: float = 0.0, observations: np.ndarray | None = None):
    """Play `actions` from the maze of `seed` with the noise-free expert riding along: (since (T,):
    steps since the current target was last in view, -1 never; labels (T,): the expert's actions;
    rewards (T,)). observations: the episode's (T, ...) frames, checked against the replay."""
    from rate_core.envs.memory_maze import ExploringMemoryMazeExpert, MemoryMazeEnv

    env = MemoryMazeEnv(step_cap=len(actions))
    obs, info = env.reset(seed=int(seed))
    expert = ExploringMemoryMazeExpert(noise=0.0, recall=recall)
    expert.reset(env, info)
    since, labels, rewards = (np.zeros(len(actions), dtype=np.int64) for _ in range(3))
    for t, action in enumerate(actions):
        if observations is not None and t % 100 == 0 and not np.array_equal(obs, observations[t]):
            raise ValueError(f"episode of seed {seed}: the replay's frame {t} differs from the dataset's; "
                             "--data must be collected from consecutive seeds (collect --seed)")
        labels[t] = expert.act(env, obs, info)
        # the expert has just looked around: it keeps the step each target was last in view (whatever its recall)
        seen_at = expert.target_seen_at[env.target_index]
        since[t] = expert.steps - seen_at if seen_at > -np.inf else -1
        obs, rewards[t], _, _, info = env.step(int(action))
    env.close()
    return since, labels, rewards


def bucket_table(since: np.ndarray, values: dict[str, np.ndarray]) -> list[dict]:
    """Per bucket of BUCKETS: its share of the steps and the mean of each of `values` (steps,)."""
    rows = []
    for name, low, high in BUCKETS:
        mask = (since >= low) & (since <= high)
        rows.append({"bucket": name, "share": float(mask.mean()),
                     **{key: float(v[mask].mean()) if mask.any() else float("nan") for key, v in values.items()}})
    return rows


@torch.no_grad()
def teacher_states(model, data, progress=True) -> list[dict]:
    """Part 1: the model's reading of the teacher's held-out episodes, acting step by step."""
    n, steps = data.num_episodes, int(data.episode_lengths().min())

    def take(array):  # (n, steps): the first `steps` of every episode
        return np.stack([array[data.episode_starts[e]:data.episode_starts[e] + steps] for e in range(n)])

    obs, actions, rtg = take(data.observations), take(data.actions), take(data.returns_to_go)
    targets = take(data.labels if data.labels is not None else data.actions)
    if "seed" not in (data.meta.get("settings") or {}):
        raise SystemExit(f"error: {data.path} does not record its first seed (a merged dataset?); give --data a "
                         "folder made by collect --teacher --seed S")
    first_seed = int(data.meta["settings"]["seed"])
    since = np.stack([replay(first_seed + e, actions[e], observations=obs[e])[0]
                      for e in tqdm(range(n), desc="replaying the teacher's episodes", disable=not progress)])
    policy = make_policy(model, n)
    right, p_label = np.zeros((n, steps)), np.zeros((n, steps))
    device = next(model.parameters()).device
    for t in tqdm(range(steps), desc="model on the teacher's steps", disable=not progress):
        logits = policy.logits(torch.from_numpy(rtg[:, t]).float().to(device), torch.from_numpy(obs[:, t]).to(device))
        probs = logits.float().softmax(-1).cpu().numpy()
        right[:, t] = probs.argmax(-1) == targets[:, t]
        p_label[:, t] = probs[np.arange(n), targets[:, t]]
        policy.record_action(torch.from_numpy(actions[:, t]).to(device))
    return bucket_table(since.ravel(), {"agrees": right.ravel(), "p_label": p_label.ravel()})


def own_states(model, episodes: int, seed: int, recall: float, steps: int = 1000,
               progress=True) -> tuple[list[dict], float]:
    """Part 2: the model's own episodes, labelled by the expert riding along; and their mean return."""
    seeds = list(range(seed, seed + episodes))
    env = TASK.make_vector_env(episodes, step_cap=steps)
    try:
        batch = run_episodes(model, env, seeds, TASK.evaluation.target_return, sample=True, trace=True)
    finally:
        env.close()
    since, agrees, p_label = [], [], []
    for trace in tqdm(batch.traces, desc="replaying the model's episodes", disable=not progress):
        s, labels, rewards = replay(trace.seed, trace.actions, recall)
        if not np.array_equal(rewards, trace.rewards):
            raise RuntimeError(f"seed {trace.seed}: the replay's rewards differ from the episode's")
        since.append(s)
        agrees.append(trace.actions == labels)
        p_label.append(trace.probs[np.arange(len(labels)), labels])
    table = bucket_table(np.concatenate(since), {"agrees": np.concatenate(agrees), "p_label": np.concatenate(p_label)})
    return table, float(batch.returns.mean())


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    try:
        model = load_checkpoint(args.checkpoint, task=TASK.name).eval()
        data = load_dataset(args.data, task=TASK.name)
    except (CheckpointError, DatasetError) as error:
        raise SystemExit(f"error: {error}") from None
    forced = teacher_states(model, data)
    own, mean_return = own_states(model, args.episodes, args.seed, args.recall, args.steps)
    print(f"{args.checkpoint}: {data.num_episodes} teacher episodes ({args.data}); {args.episodes} of its own "
          f"(seeds {args.seed}-{args.seed + args.episodes - 1}, mean return {mean_return:.2f})")
    print(f"{'target last in view':>20} | {'teacher: share':>14} {'agrees':>7} {'p(label)':>8} | "
          f"{'own: share':>10} {'agrees':>7} {'p(label)':>8}")
    for a, b in zip(forced, own, strict=True):
        print(f"{a['bucket']:>20} | {a['share']:14.3f} {a['agrees']:7.3f} {a['p_label']:8.3f} | "
              f"{b['share']:10.3f} {b['agrees']:7.3f} {b['p_label']:8.3f}")


if __name__ == "__main__":
    run_main(main, cli(Args))
