"""Does a ViZDoom-Two-Colors agent act on the pillar's colour? Three probes of a checkpoint.

    python -m training.colour_probe --checkpoint assets/checkpoints/vizdoom_two_colors/rate

1. Acting (closed loop): the agent plays (sampled actions); at every step where the expert's action
   differs from the action the same expert would take for the other pillar colour, it records the
   agent's probability of each. An agent that uses the colour prefers the expert's action; a
   colour-blind one prefers either about half the time. Right and wrong pickups are counted too.
2. Teacher-forced (the expert's episodes, 150 steps, with its random actions): the same comparison
   when the history holds the expert's actions, and again with those actions replaced by padding.
   A clone that follows the expert only when fed the expert's actions copies its history.
3. Memory (recurrent models): is the colour linearly decodable (logistic regression, fitted on one
   half of the episodes, scored on the other) from the memory after the first segment, and from the
   observation encoder's output on the first frame, where the pillar is in view?
"""

import copy
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from tqdm import tqdm

from rate_core.checkpoint import CheckpointError, load_checkpoint
from rate_core.model import ACTION_PAD
from rate_core.rollout import make_policy
from rate_core.tasks import get_task
from training.cli import AtLeast, AtMost, cli, run_main
from training.step import segment_slices

TASK = get_task("vizdoom_two_colors")

WINDOWS = ((0, 45), (45, 150), (150, 300))  # the pillar stands for the first 45 steps


@dataclass
class Args:
    """Probe whether a ViZDoom-Two-Colors checkpoint acts on, and remembers, the pillar's colour."""

    checkpoint: str
    """checkpoint folder (config.json + model.safetensors)"""
    episodes: Annotated[int, AtLeast(1)] = 12
    """episodes of the acting probe (300 steps at most each)"""
    forced_episodes: Annotated[int, AtLeast(0)] = 24
    """episodes of the teacher-forced probe (150 steps each); 0: skip it"""
    memory_episodes: Annotated[int, AtLeast(0)] = 300
    """episodes of the memory probe (first segment, the teacher's actions; half fit the decoder, half score
    it, so at least 4); 0: skip it"""
    cue: Annotated[int, AtLeast(0), AtMost(2)] = 0
    """the env's cue, for a model trained with it: 1 the pillar's colour in every frame (the oracle cue), 2 only
    while the pillar stands"""
    seed: Annotated[int, AtLeast(0)] = 20_000
    """first seed (far from the training data's 1,000,000 and the evaluator's 0)"""
    threads: Annotated[int, AtLeast(1)] = 1
    """torch threads"""


def acting_probe(model, episodes: int, seed: int, steps: int = 300, cue: int = 0) -> list[dict]:
    """Per window of WINDOWS: colour-decisive steps, mean probabilities, preference, pickups."""
    from rate_core.envs.vizdoom_two_colors import TwoColorsEnv, TwoColorsExpert

    env, expert = TwoColorsEnv(step_cap=steps, cue=cue), TwoColorsExpert(noise=0.0)
    decisive, pickups = [], []
    generator = torch.Generator().manual_seed(seed)
    for episode_seed in tqdm(range(seed, seed + episodes), desc="acting probe", unit="episode"):
        obs, info = env.reset(seed=episode_seed)
        expert.reset(env, info)
        policy = make_policy(model, 1)
        rtg, health = TASK.evaluation.target_return, info["health"]
        for t in range(steps):
            other = copy.copy(expert)
            other.is_red = not expert.is_red
            a_other, a_expert = other.act(env, obs, info), expert.act(env, obs, info)
            with torch.no_grad():
                logits = policy.logits(torch.tensor([rtg]), torch.from_numpy(obs)[None])
            p = logits.float().softmax(-1)[0]
            action = int(torch.multinomial(p, 1, generator=generator))
            policy.record_action(torch.tensor([action]))
            if a_expert != a_other:
                decisive.append((t, float(p[a_expert]), float(p[a_other])))
            obs, reward, terminated, truncated, info = env.step(action)
            rtg -= reward
            pickups.append((t, reward > 0.5, info["health"] - health < -9))
            health = info["health"]
            if terminated or truncated:
                break
    env.close()
    d, k = np.array(decisive).reshape(-1, 3), np.array(pickups).reshape(-1, 3)
    rows = []
    for lo, hi in WINDOWS:
        w, q = d[(d[:, 0] >= lo) & (d[:, 0] < hi)], k[(k[:, 0] >= lo) & (k[:, 0] < hi)]
        rows.append({"steps": f"{lo}-{hi}", **_preference(w[:, 1:]),
                     "right_pickups": int(q[:, 1].sum()), "wrong_pickups": int(q[:, 2].sum())})
    return rows


def _preference(rows) -> dict:
    """Colour-decisive steps, the mean probabilities of (expert's, other colour's) action pairs in
    `rows`, and how often the expert's was the likelier."""
    d = np.array(rows, dtype=float).reshape(-1, 2)
    return {"decisive": len(d), "p_expert": float(d[:, 0].mean()) if len(d) else float("nan"),
            "p_other_colour": float(d[:, 1].mean()) if len(d) else float("nan"),
            "expert_preferred": float(np.mean(d[:, 0] > d[:, 1])) if len(d) else float("nan")}


def teacher_forced_probe(model, episodes: int, seed: int, steps: int = 150, cue: int = 0) -> dict:
    """On the expert's own episodes (noise 0.1, as the data): the model's probabilities of the
    expert's action and of the other colour's at colour-decisive steps where the expert did not act
    at random, with the actions taken as inputs ("actions") and with them padded ("no_actions")."""
    from rate_core.envs.vizdoom_two_colors import TwoColorsEnv, TwoColorsExpert

    env, expert = TwoColorsEnv(step_cap=steps, cue=cue), TwoColorsExpert(noise=0.1)
    found = {"actions": [], "no_actions": []}
    for episode_seed in tqdm(range(seed, seed + episodes), desc="teacher-forced probe", unit="episode"):
        obs, info = env.reset(seed=episode_seed)
        expert.reset(env, info)
        observations, actions, rewards, decisive = [], [], [], []
        while True:
            clean, other = copy.copy(expert), copy.copy(expert)
            clean.noise = other.noise = 0.0
            other.is_red = not expert.is_red
            a_clean, a_other = clean.act(env, obs, info), other.act(env, obs, info)
            action = expert.act(env, obs, info)
            if action == a_clean != a_other:
                decisive.append((len(actions), a_clean, a_other))
            observations.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, info = env.step(action)
            rewards.append(reward)
            if terminated or truncated:
                break
        rtg = torch.tensor(np.cumsum(rewards[::-1])[::-1].copy(), dtype=torch.float32)[None]
        obs_t, taken = torch.from_numpy(np.stack(observations))[None], torch.tensor(actions)[None]
        for name, inputs in (("actions", taken), ("no_actions", torch.full_like(taken, ACTION_PAD))):
            state, logits = None, []
            with torch.no_grad():
                for part in segment_slices(model, len(actions)):
                    out, state = model(rtg[:, part], obs_t[:, part], inputs[:, part], state)
                    logits.append(out)
            p = torch.cat(logits, dim=1)[0].float().softmax(-1)
            found[name] += [(float(p[t, a]), float(p[t, b])) for t, a, b in decisive]
    env.close()
    return {name: _preference(rows) for name, rows in found.items()}


def held_out_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Logistic regression (L2) fitted on the first half, accuracy on the second."""
    n = len(labels) // 2
    mean, std = features[:n].mean(0), features[:n].std(0) + 1e-6
    x = torch.tensor((features - mean) / std, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:n] @ w + b, y[:n]) + 1e-2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((x[n:] @ w + b > 0).float() == y[n:]).float().mean())


def memory_probe(model, episodes: int, seed: int, cue: int = 0) -> dict:
    """Held-out accuracy of decoding the colour from the memory after segment 1 and from the encoder's
    output on the first frame (first segments of teacher episodes, teacher-forced)."""
    from training.collect import run_episode

    steps = model.config.context_length
    memory, first_frame, colours = [], [], []
    for episode_seed in tqdm(range(seed, seed + episodes), desc="memory probe", unit="episode"):
        episode = run_episode(TASK, {"step_cap": steps, "cue": cue}, episode_seed, teacher=True)
        if len(episode["actions"]) < steps:
            continue
        rewards = episode["rewards"].astype(np.float32)
        rtg = torch.from_numpy(np.cumsum(rewards[::-1])[::-1].copy())[None]
        o = torch.from_numpy(episode["observations"])
        with torch.no_grad():
            _, state = model(rtg, o[None], torch.from_numpy(episode["actions"])[None], None)
            first_frame.append(model.obs_encoder(o[:1]).float()[0].numpy())
        if state.memory is not None:
            memory.append(state.memory[0].flatten().float().numpy())
        colours.append(episode["reset_info"]["is_red"])
    labels = np.array(colours)
    result = {"episodes": len(labels), "red_share": float(labels.mean()),
              "encoder_first_frame": held_out_accuracy(np.stack(first_frame), labels)}
    if memory:
        result["memory_after_segment_1"] = held_out_accuracy(np.stack(memory), labels)
    return result


def main(args: Args) -> None:
    if 0 < args.memory_episodes < 4:
        raise SystemExit(f"error: --memory-episodes: half of them fit the colour decoder and half score it, so "
                         f"give at least 4 (or 0 to skip the memory probe), got {args.memory_episodes}")
    torch.set_num_threads(args.threads)
    try:
        model = load_checkpoint(args.checkpoint, task=TASK.name).eval()
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    rows = acting_probe(model, args.episodes, args.seed, cue=args.cue)
    print(f"acting ({args.episodes} episodes): at steps where the expert's action differs from the other colour's")
    for r in rows:
        print(f"  steps {r['steps']:>7}: {r['decisive']:4d} such steps, p(expert's) {r['p_expert']:.3f}, "
              f"p(other colour's) {r['p_other_colour']:.3f}, expert's preferred at {r['expert_preferred']:.2f}; "
              f"pickups right {r['right_pickups']}, wrong {r['wrong_pickups']}")
    if args.forced_episodes:
        f = teacher_forced_probe(model, args.forced_episodes, args.seed + 5_000, cue=args.cue)
        print(f"teacher-forced ({args.forced_episodes} expert episodes, {f['actions']['decisive']} such steps where "
              "the expert did not act at random):")
        for name, label in (("actions", "the expert's actions as inputs"), ("no_actions", "actions padded")):
            print(f"  {label:>30}: p(expert's) {f[name]['p_expert']:.3f}, p(other colour's) "
                  f"{f[name]['p_other_colour']:.3f}, expert's preferred at {f[name]['expert_preferred']:.2f}")
    if args.memory_episodes:
        m = memory_probe(model, args.memory_episodes, args.seed + 10_000, args.cue)
        print(f"colour decodable (held-out accuracy over {m['episodes'] - m['episodes'] // 2} episodes, "
              f"red share {m['red_share']:.2f}): encoder on the first frame {m['encoder_first_frame']:.2f}"
              + (f", memory after segment 1 {m['memory_after_segment_1']:.2f}"
                 if "memory_after_segment_1" in m else ""))


if __name__ == "__main__":
    run_main(main, cli(Args))
