"""What does a ViZDoom-Two-Colors dataset teach, before memory? Clone it with a memoryless policy.

    python -m training.frame_probe --behaviour expert --cue 1    # the expert's data, colour in every frame (~6 min)
    python -m training.frame_probe --behaviour neutral --cue 1   # colour-neutral behaviour, same labels
    python -m training.frame_probe --behaviour neutral --cue 1 --frames 2   # and the frame before

The policy is the model's image encoder and one linear layer: it sees the current frame only, no
history and no memory (with `frames` > 1 also the frames before it, each through the same encoder,
their features side by side: what moved since the last step tells the last action, which a policy
with history may copy instead of reading the colour). It is trained (cross-entropy, the expert's
action as the label) on `episodes` fresh episodes of 150 steps, scored on `test_episodes` others
and then played.

Behaviour (what the data's agent does; the label is always the noise-free expert's action for the
pillar's colour, from training.collect's TwoColorsTeacher):
- expert: the expert itself, a random action at 10% of the steps (the shipped data's recipe).
- neutral: in blocks of `block` steps it follows the expert of the other colour about half of the
  time, so that what lies ahead says nothing about which colour is right.

Scores on the test episodes, at the steps where the expert's action differs from the other colour's
expert's: how often the policy ranks the expert's action above the other colour's ("prefers"), over
all steps, while the pillar stands (steps 0-44) and after it has gone. Then the return of
`play_episodes` episodes (seeds from 0, sampled actions, the task's 2,100-step cap). With the cue
(cue=1) the colour is in every frame, so a policy that learnt the task plays well without memory.
"""

import collections
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from torch import nn
from tqdm import tqdm

from rate_core.envs.vizdoom_two_colors import CUES, TwoColorsEnv, TwoColorsTeacher
from rate_core.model import ImageEncoder
from training.evaluate import standard_error

PILLAR_STEPS = 45


@dataclass
class Args:
    """Clone a ViZDoom-Two-Colors dataset with a memoryless frame-only policy and play it."""

    behaviour: Literal["expert", "neutral"] = "neutral"
    """the data's agent: the expert (10% random actions), or colour-neutral blocks (module docstring)"""
    cue: int = 1
    """environment cue: 0 none, 1 the colour in every frame, 2 only while the pillar stands"""
    episodes: int = 400
    """training episodes of 150 steps (seeds from `seed`)"""
    test_episodes: int = 60
    """held-out episodes for the scores (seeds from seed + 1,000,000)"""
    epochs: int = 12
    """passes over the training frames (the colour is learnt late and at once: 6 were not always enough)"""
    block: int = 25
    """neutral behaviour: steps per detour to the other colour"""
    play_episodes: int = 20
    """episodes played after training (0: do not play)"""
    play_cap: int = 2100
    """step cap of the played episodes"""
    seed: int = 3_000_000
    """first training seed (away from the datasets' 1,000,000 and the evaluator's 0)"""
    workers: int = 2
    """processes collecting episodes"""
    threads: int = 2
    """torch threads"""
    frames: int = 1
    """frames the policy sees: the current one and frames - 1 before it (the first frame repeated
    before an episode's start)"""


def _behaviour(kind: str, block: int):
    if kind == "expert":
        return TwoColorsTeacher(noise=0.1, detour=0.0)
    # a block starts at a step outside one with probability 1 / block: half of the steps are detours
    return TwoColorsTeacher(noise=0.1, detour=1.0 / block, detour_min=block, detour_max=block)


def _collect(job) -> dict:
    """Frames, labels, the other colour's expert's actions and step numbers of some episodes."""
    seeds, kind, block, cue = job
    env, teacher = TwoColorsEnv(step_cap=150, cue=cue), _behaviour(kind, block)
    frames, labels, others, steps = [], [], [], []
    try:
        for seed in seeds:
            obs, info = env.reset(seed=int(seed))
            teacher.reset(env, info)
            for step in range(150):
                action, label = teacher.act_and_label(env, obs, info)
                frames.append(obs)
                labels.append(label)
                others.append(teacher.last_decoy)
                steps.append(step)
                obs, _, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    break
    finally:
        env.close()
    return dict(frames=np.stack(frames), labels=np.array(labels), others=np.array(others), steps=np.array(steps))


def collect_frames(kind: str, block: int, cue: int, first_seed: int, episodes: int, workers: int) -> dict:
    chunks = [list(chunk) for chunk in np.array_split(np.arange(first_seed, first_seed + episodes), max(1, workers * 4))
              if len(chunk)]
    jobs = [(chunk, kind, block, cue) for chunk in chunks]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        parts = list(tqdm(pool.map(_collect, jobs), total=len(jobs), desc=f"collecting {episodes} episodes", unit="chunk"))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


class FramePolicy(nn.Module):
    """The task's image encoder (convolutions 16/32/32) on each of `frames` frames and a linear layer
    on their features: (B, frames, 3, H, W) uint8 -> action logits (B, act_dim)."""

    def __init__(self, frames: int = 1, obs_shape=(3, 64, 112), act_dim: int = 5):
        super().__init__()
        self.encoder = ImageEncoder(obs_shape, 128, (16, 32, 32))
        self.head = nn.Linear(128 * frames, act_dim)

    def forward(self, stacks: torch.Tensor) -> torch.Tensor:
        features = self.encoder(stacks.flatten(0, 1))
        return self.head(features.reshape(stacks.shape[0], -1))


def history_index(steps: np.ndarray, frames: int) -> np.ndarray:
    """(n, frames) rows into the frames of episodes laid end to end (`steps`: each frame's step in its
    episode): the `frames` frames up to each one, oldest first, the episode's first frame repeated
    before its start."""
    back = np.arange(frames - 1, -1, -1)
    return np.arange(len(steps))[:, None] - np.minimum(back[None, :], steps[:, None])


def scores(policy: nn.Module, data: dict, frames: int = 1) -> dict:
    policy.eval()
    with torch.no_grad():
        images, index = torch.from_numpy(data["frames"]), torch.from_numpy(history_index(data["steps"], frames))
        logits = torch.cat([policy(images[index[i:i + 512]]) for i in range(0, len(index), 512)])
    policy.train()
    labels, others = torch.from_numpy(data["labels"]).long(), torch.from_numpy(data["others"]).long()
    differ = labels != others
    late = differ & torch.from_numpy(data["steps"] >= PILLAR_STEPS)
    early = differ & ~late
    prefers = logits.gather(1, labels[:, None])[:, 0] > logits.gather(1, others[:, None])[:, 0]
    return dict(loss=nn.functional.cross_entropy(logits, labels).item(),
                accuracy=(logits.argmax(1) == labels).float().mean().item(),
                differing_steps=int(differ.sum()), prefers=prefers[differ].float().mean().item(),
                prefers_while_pillar=prefers[early].float().mean().item(),
                prefers_after_pillar=prefers[late].float().mean().item())


def train_policy(data: dict, test: dict, epochs: int, seed: int = 0,
                 frames: int = 1) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(seed)
    policy = FramePolicy(frames)
    optimiser = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=1e-3)
    images, labels = torch.from_numpy(data["frames"]), torch.from_numpy(data["labels"]).long()
    index = torch.from_numpy(history_index(data["steps"], frames))
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        for start in tqdm(range(0, len(images), 128), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False):
            batch = order[start:start + 128]
            loss = nn.functional.cross_entropy(policy(images[index[batch]]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        history.append(scores(policy, test, frames))
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in history[-1].items()), flush=True)
    return policy, history


def play(policy: nn.Module, episodes: int, cue: int, step_cap: int = 2100, frames: int = 1) -> np.ndarray:
    """Returns of `episodes` episodes (seeds 0, 1, ...), sampled actions, the policy fed its last `frames` frames."""
    env, generator, returns = TwoColorsEnv(step_cap=step_cap, cue=cue), torch.Generator().manual_seed(0), []
    policy.eval()
    try:
        for seed in tqdm(range(episodes), desc="playing", unit="episode"):
            obs, _ = env.reset(seed=seed)
            recent = collections.deque([obs] * frames, maxlen=frames)
            total, over = 0.0, False
            while not over:
                with torch.no_grad():
                    probs = policy(torch.from_numpy(np.stack(recent))[None])[0].softmax(-1)
                obs, reward, terminated, truncated, _ = env.step(int(torch.multinomial(probs, 1, generator=generator)))
                recent.append(obs)
                total += reward
                over = terminated or truncated
            returns.append(total)
    finally:
        env.close()
        policy.train()
    return np.array(returns)


def main(args: Args) -> dict:
    for name in ("episodes", "test_episodes", "epochs", "block", "play_cap", "workers", "threads", "frames"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.cue not in CUES:  # checked here: the envs are made in the collecting processes
        raise SystemExit(f"error: --cue is 0 (none), 1 (every frame) or 2 (while the pillar stands), got {args.cue}")
    torch.set_num_threads(args.threads)
    started = time.time()
    data = collect_frames(args.behaviour, args.block, args.cue, args.seed, args.episodes, args.workers)
    test = collect_frames(args.behaviour, args.block, args.cue, args.seed + 1_000_000, args.test_episodes, args.workers)
    print(f"{len(data['labels']):,} training frames, {len(test['labels']):,} test frames "
          f"({time.time() - started:.0f} s); behaviour {args.behaviour}, cue {args.cue}")
    policy, history = train_policy(data, test, args.epochs, frames=args.frames)
    result = dict(behaviour=args.behaviour, cue=args.cue, frames=args.frames, training_frames=len(data["labels"]),
                  **history[-1])
    if args.play_episodes:
        returns = play(policy, args.play_episodes, args.cue, args.play_cap, args.frames)
        sem = standard_error(returns)
        result.update(play_return=float(returns.mean()), play_sem=sem)
        print(f"played {len(returns)} episodes (cue {args.cue}, cap {args.play_cap}): "
              f"return {returns.mean():.2f} +- {sem:.2f}")
    print(f"took {time.time() - started:.0f} s")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
