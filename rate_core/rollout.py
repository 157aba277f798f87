"""Run a model in many environments in lockstep, on the model's device.

Segment-recurrent modes (rate, rmt, trxl) act inside a segment of K steps from the segment's
tokens so far plus the memory and cache carried in; when a segment is full, one more pass over
the finished segment (its last action included, exactly as in training) produces the next
memory and cache. DT acts from a sliding window of its last K * N steps.
"""

from dataclasses import dataclass

import numpy as np
import torch

from rate_core.model import ACTION_PAD, MemoryTransformer


@dataclass
class EpisodeBatch:
    """Outcome of lockstep episodes: one entry per environment."""

    returns: np.ndarray
    lengths: np.ndarray
    successes: np.ndarray


class SegmentRecurrentPolicy:
    """Acts for a batch of envs step by step with cached keys and values (rate, rmt, trxl).

    Each step processes only the new tokens (the previous action, R_t, o_t); a finished segment
    gets one full pass with its last action (as in training) for the next memory and cache."""

    def __init__(self, model: MemoryTransformer, num_envs: int):
        self.model = model
        self.state = model.initial_state(num_envs)
        self.prefixes = model.begin_segment(self.state)
        self.segment_kv, self.done_tokens = None, 0
        self.history = []  # (rtg, obs, action) of the current segment's steps

    def logits(self, rtg: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """rtg (B,), obs (B, *obs_shape) of the current step -> action logits (B, A)."""
        model = self.model
        pad = torch.full((rtg.shape[0], 1), ACTION_PAD, dtype=torch.long, device=rtg.device)
        tokens = model.embed(rtg[:, None], obs[:, None], pad)[:, :2]  # R_t, o_t
        if self.history:
            previous = self.history[-1][2]
            tokens = torch.cat([model.action_encoder(previous)[:, None], tokens], dim=1)
        hidden, self.segment_kv = model.extend_segment(tokens, self.prefixes, self.segment_kv, self.done_tokens)
        self.done_tokens += tokens.shape[1]
        self.history.append([rtg, obs, None])
        return model.head(hidden[:, -1])

    def record_action(self, action: torch.Tensor) -> None:
        self.history[-1][2] = action
        if len(self.history) == self.model.config.segment_steps:
            rtg, obs, actions = (torch.stack(x, dim=1) for x in zip(*self.history))
            _, self.state = self.model(rtg, obs, actions, self.state)
            self.prefixes = self.model.begin_segment(self.state)
            self.segment_kv, self.done_tokens, self.history = None, 0, []


class SlidingWindowPolicy:
    """DT: recomputes its window of the last K * N steps at every step, batched over envs."""

    def __init__(self, model: MemoryTransformer, num_envs: int):
        self.model = model
        self.history = []

    def logits(self, rtg: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        self.history.append([rtg, obs, torch.full_like(rtg, ACTION_PAD, dtype=torch.long)])
        del self.history[: -self.model.config.segment_steps]
        rtg_w, obs_w, act_w = (torch.stack(x, dim=1) for x in zip(*self.history))
        return self.model(rtg_w, obs_w, act_w)[0][:, -1]

    def record_action(self, action: torch.Tensor) -> None:
        self.history[-1][2] = action


def make_policy(model: MemoryTransformer, num_envs: int):
    return SlidingWindowPolicy(model, num_envs) if model.config.mode == "dt" else SegmentRecurrentPolicy(model, num_envs)


@torch.no_grad()
def run_episodes(model: MemoryTransformer, vector_env, seeds, target_return: float, sample: bool = False,
                 max_steps: int | None = None, generator: torch.Generator | None = None,
                 progress=None) -> EpisodeBatch:
    """Play one episode in each env of `vector_env` (autoreset disabled), seeded by `seeds`.

    target_return: return-to-go at the first step (then R_{t+1} = R_t - r_t); sample: draw actions
    from the softmax instead of the argmax; max_steps: stop after this many steps (default: when
    every env is done); progress: optional callable(step) for progress bars.
    """
    model.eval()
    device = next(model.parameters()).device
    num = vector_env.num_envs
    obs, _ = vector_env.reset(seed=list(seeds))
    obs_dtype = torch.uint8 if model.config.obs_kind == "image" else torch.float32
    policy = make_policy(model, num)
    rtg = torch.full((num,), float(target_return), device=device)
    returns = np.zeros(num)
    lengths = np.zeros(num, dtype=np.int64)
    successes = np.zeros(num, dtype=bool)
    done = np.zeros(num, dtype=bool)
    step = 0
    while not done.all() and (max_steps is None or step < max_steps):
        logits = policy.logits(rtg, torch.as_tensor(obs, device=device).to(obs_dtype))
        if sample:
            action = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        else:
            action = logits.argmax(-1)
        policy.record_action(action)
        obs, reward, terminated, truncated, info = vector_env.step(action.cpu().numpy())
        active = ~done
        returns[active] += reward[active]
        lengths[active] += 1
        if "success" in info:
            successes[active] |= np.asarray(info["success"])[active]
        done |= np.asarray(terminated) | np.asarray(truncated)
        rtg = rtg - torch.as_tensor(reward, device=device, dtype=torch.float32)
        step += 1
        if progress is not None:
            progress(step)
    return EpisodeBatch(returns, lengths, successes)
