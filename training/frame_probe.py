"""What does a ViZDoom-Two-Colors dataset teach, before memory? Clone it with a memoryless policy.

    python -m training.frame_probe --behaviour expert --cue 1    # the expert's data, colour in every frame (~6 min)
    python -m training.frame_probe --behaviour neutral --cue 1   # colour-neutral behaviour, same labels
    python -m training.frame_probe --behaviour neutral --cue 1 --frames 2   # and the frame before
    python -m training.frame_probe --cue 0 --first-frame --head-hidden 256 --aux-weight 1   # no cue, pillar frame kept

The policy is the model's image encoder and one linear layer: it sees the current frame only, no
history and no memory (with `frames` > 1 also the frames before it, each through the same encoder,
their features side by side: what moved since the last step tells the last action, which a policy
with history may copy instead of reading the colour; with `first_frame` also the episode's first frame,
where the pillar stands in view: a perfect memory of it, which only a head with a hidden layer can
combine with the current view, and `aux_weight` asks the first frame's features for the colour). It
is trained (cross-entropy, the expert's
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
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rate_core.envs.vizdoom_two_colors import CUES, TwoColorsEnv, TwoColorsTeacher
from rate_core.model import ImageEncoder
from training.cli import AtLeast, cli, run_main, stop_pool, worker_pool
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
    seed: Annotated[int, AtLeast(0)] = 3_000_000
    """first training seed (away from the datasets' 1,000,000 and the evaluator's 0)"""
    workers: int = 2
    """processes collecting episodes"""
    threads: int = 2
    """torch threads"""
    frames: int = 1
    """frames the policy sees: the current one and frames - 1 before it (the first frame repeated
    before an episode's start)"""
    first_frame: bool = False
    """also show the policy the episode's first frame (the pillar in view): a perfect memory of it"""
    head_hidden: int = 0
    """hidden units of the policy's head (0: one linear layer on the frames' features, which can only
    add what each frame says; a hidden layer can combine the first frame's colour with the view)"""
    aux_weight: float = 0.0
    """weight of an auxiliary loss (0: off; needs --first-frame): a linear layer on the first frame's
    features predicts the pillar's colour, as `train --aux-weight` asks of RATE"""


def _behaviour(kind: str, block: int):
    if kind == "expert":
        return TwoColorsTeacher(noise=0.1, detour=0.0)
    # a block starts at a step outside one with probability 1 / block: half of the steps are detours
    return TwoColorsTeacher(noise=0.1, detour=1.0 / block, detour_min=block, detour_max=block)


def _collect(job) -> dict:
    """Frames, labels, the other colour's expert's actions and step numbers of some episodes."""
    seeds, kind, block, cue = job
    env, teacher = TwoColorsEnv(step_cap=150, cue=cue), _behaviour(kind, block)  # stop_pool's SIGTERM closes it
    frames, labels, others, steps, red = [], [], [], [], []
    try:
        for seed in seeds:
            obs, info = env.reset(seed=int(seed))
            teacher.reset(env, info)
            for step in range(150):
                action, label = teacher.act_and_label(env, obs, info)
                red.append(int(info["is_red"]))
                frames.append(obs)
                labels.append(label)
                others.append(teacher.last_decoy)
                steps.append(step)
                obs, _, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    break
    finally:
        env.close()
    return dict(frames=np.stack(frames), labels=np.array(labels), others=np.array(others), steps=np.array(steps),
                red=np.array(red))


def collect_frames(kind: str, block: int, cue: int, first_seed: int, episodes: int, workers: int) -> dict:
    chunks = [list(chunk) for chunk in np.array_split(np.arange(first_seed, first_seed + episodes), max(1, workers * 4))
              if len(chunk)]
    jobs = [(chunk, kind, block, cue) for chunk in chunks]
    pool = worker_pool(max(1, workers))
    try:
        parts = list(tqdm(pool.map(_collect, jobs), total=len(jobs), desc=f"collecting {episodes} episodes",
                          unit="chunk"))
    finally:
        stop_pool(pool)
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


class FramePolicy(nn.Module):
    """The task's image encoder (convolutions 16/32/32) on each of `frames` frames and a head on their
    features side by side (a linear layer, or with `head_hidden` one hidden ReLU layer first):
    (B, frames, 3, H, W) uint8 -> action logits (B, act_dim). colour: a linear layer on the first
    frame's features that gives the pillar's colour as one logit (red)."""

    def __init__(self, frames: int = 1, obs_shape=(3, 64, 112), act_dim: int = 5, head_hidden: int = 0,
                 colour: bool = False):
        super().__init__()
        self.encoder = ImageEncoder(obs_shape, 128, (16, 32, 32))
        self.head = nn.Linear(128 * frames, act_dim) if not head_hidden else nn.Sequential(
            nn.Linear(128 * frames, head_hidden), nn.ReLU(), nn.Linear(head_hidden, act_dim))
        self.colour = nn.Linear(128, 1) if colour else None

    def forward(self, stacks: torch.Tensor) -> torch.Tensor:
        return self.logits_and_colour(stacks)[0]

    def logits_and_colour(self, stacks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Action logits (B, act_dim) and the red logit (B,) (None without the colour layer)."""
        features = self.encoder(stacks.flatten(0, 1)).reshape(stacks.shape[0], stacks.shape[1], -1)
        red = self.colour(features[:, 0])[:, 0] if self.colour is not None else None
        return self.head(features.flatten(1)), red


def history_index(steps: np.ndarray, frames: int, first_frame: bool = False) -> np.ndarray:
    """(n, frames) rows into the frames of episodes laid end to end (`steps`: each frame's step in its
    episode): the `frames` frames up to each one, oldest first, the episode's first frame repeated
    before its start; with first_frame, (n, 1 + frames), the episode's first frame in front."""
    back = np.arange(frames - 1, -1, -1)
    index = np.arange(len(steps))[:, None] - np.minimum(back[None, :], steps[:, None])
    if first_frame:
        index = np.concatenate([(np.arange(len(steps)) - steps)[:, None], index], axis=1)
    return index


def scores(policy: nn.Module, data: dict, frames: int = 1, first_frame: bool = False) -> dict:
    policy.eval()
    with torch.no_grad():
        images = torch.from_numpy(data["frames"])
        index = torch.from_numpy(history_index(data["steps"], frames, first_frame))
        outputs = [policy.logits_and_colour(images[index[i:i + 512]]) for i in range(0, len(index), 512)]
    policy.train()
    logits = torch.cat([logit for logit, _ in outputs])
    labels, others = torch.from_numpy(data["labels"]).long(), torch.from_numpy(data["others"]).long()
    differ = labels != others
    late = differ & torch.from_numpy(data["steps"] >= PILLAR_STEPS)
    early = differ & ~late
    prefers = logits.gather(1, labels[:, None])[:, 0] > logits.gather(1, others[:, None])[:, 0]
    result = dict(loss=nn.functional.cross_entropy(logits, labels).item(),
                  accuracy=(logits.argmax(1) == labels).float().mean().item(),
                  differing_steps=int(differ.sum()), prefers=prefers[differ].float().mean().item(),
                  prefers_while_pillar=prefers[early].float().mean().item(),
                  prefers_after_pillar=prefers[late].float().mean().item())
    if policy.colour is not None:
        red = torch.cat([colour for _, colour in outputs]) > 0
        result["colour_accuracy"] = (red == torch.from_numpy(data["red"]).bool()).float().mean().item()
    return result


def train_policy(data: dict, test: dict, epochs: int, seed: int = 0, frames: int = 1, first_frame: bool = False,
                 head_hidden: int = 0, aux_weight: float = 0.0) -> tuple[nn.Module, list[dict]]:
    """Clone the data's labels (with aux_weight, plus that times the colour's cross-entropy from the first frame)."""
    torch.manual_seed(seed)
    policy = FramePolicy(frames + first_frame, head_hidden=head_hidden, colour=aux_weight > 0)
    optimiser = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=1e-3)
    images, labels = torch.from_numpy(data["frames"]), torch.from_numpy(data["labels"]).long()
    red = torch.from_numpy(data["red"]).float()
    index = torch.from_numpy(history_index(data["steps"], frames, first_frame))
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        for start in tqdm(range(0, len(images), 128), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False):
            batch = order[start:start + 128]
            logits, colour = policy.logits_and_colour(images[index[batch]])
            loss = nn.functional.cross_entropy(logits, labels[batch])
            if aux_weight:
                loss = loss + aux_weight * nn.functional.binary_cross_entropy_with_logits(colour, red[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        history.append(scores(policy, test, frames, first_frame))
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in history[-1].items()), flush=True)
    return policy, history


def play(policy: nn.Module, episodes: int, cue: int, step_cap: int = 2100, frames: int = 1,
         first_frame: bool = False) -> np.ndarray:
    """Returns of `episodes` episodes (seeds 0, 1, ...), sampled actions, the policy fed its last `frames`
    frames (with first_frame, the episode's first frame in front)."""
    env, generator, returns = TwoColorsEnv(step_cap=step_cap, cue=cue), torch.Generator().manual_seed(0), []
    policy.eval()
    try:
        for seed in tqdm(range(episodes), desc="playing", unit="episode"):
            obs, _ = env.reset(seed=seed)
            first = [obs] if first_frame else []
            recent = collections.deque([obs] * frames, maxlen=frames)
            total, over = 0.0, False
            while not over:
                with torch.no_grad():
                    probs = policy(torch.from_numpy(np.stack(first + list(recent)))[None])[0].softmax(-1)
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
    if args.play_episodes < 0:
        raise SystemExit(f"error: --play-episodes is 0 (do not play) or more, got {args.play_episodes}")
    if not (args.head_hidden >= 0 and args.aux_weight >= 0):  # nan is refused too
        raise SystemExit("error: --head-hidden and --aux-weight are 0 (off) or positive")
    if args.aux_weight and not args.first_frame:
        raise SystemExit("error: --aux-weight reads the colour from the first frame: add --first-frame")
    if args.cue not in CUES:  # checked here: the envs are made in the collecting processes
        raise SystemExit(f"error: --cue is 0 (none), 1 (every frame) or 2 (while the pillar stands), got {args.cue}")
    torch.set_num_threads(args.threads)
    started = time.time()
    data = collect_frames(args.behaviour, args.block, args.cue, args.seed, args.episodes, args.workers)
    test = collect_frames(args.behaviour, args.block, args.cue, args.seed + 1_000_000, args.test_episodes, args.workers)
    print(f"{len(data['labels']):,} training frames, {len(test['labels']):,} test frames "
          f"({time.time() - started:.0f} s); behaviour {args.behaviour}, cue {args.cue}")
    policy, history = train_policy(data, test, args.epochs, frames=args.frames, first_frame=args.first_frame,
                                   head_hidden=args.head_hidden, aux_weight=args.aux_weight)
    result = dict(behaviour=args.behaviour, cue=args.cue, frames=args.frames, first_frame=args.first_frame,
                  head_hidden=args.head_hidden, aux_weight=args.aux_weight, training_frames=len(data["labels"]),
                  **history[-1])
    if args.play_episodes:
        returns = play(policy, args.play_episodes, args.cue, args.play_cap, args.frames, args.first_frame)
        sem = standard_error(returns)
        result.update(play_return=float(returns.mean()), play_sem=sem)
        print(f"played {len(returns)} episodes (cue {args.cue}, cap {args.play_cap}): "
              f"return {returns.mean():.2f} +- {sem:.2f}")
    print(f"took {time.time() - started:.0f} s")
    return result


if __name__ == "__main__":
    run_main(main, cli(Args))
