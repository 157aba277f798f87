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
    config = model.config
    recurrent = config.mode != "dt"
    window = config.segment_steps
    state = model.initial_state(num) if recurrent else None
    rtg_hist = torch.zeros(num, 0, device=device)
    obs_hist = torch.zeros(num, 0, *config.obs_shape, device=device,
                           dtype=torch.uint8 if config.obs_kind == "image" else torch.float32)
    act_hist = torch.zeros(num, 0, dtype=torch.long, device=device)
    rtg = torch.full((num,), float(target_return), device=device)
    returns = np.zeros(num)
    lengths = np.zeros(num, dtype=np.int64)
    successes = np.zeros(num, dtype=bool)
    done = np.zeros(num, dtype=bool)
    step = 0
    while not done.all() and (max_steps is None or step < max_steps):
        rtg_hist = torch.cat([rtg_hist, rtg[:, None]], dim=1)
        obs_hist = torch.cat([obs_hist, torch.as_tensor(obs, device=device).to(obs_hist.dtype)[:, None]], dim=1)
        act_hist = torch.cat([act_hist, torch.full((num, 1), ACTION_PAD, device=device, dtype=torch.long)], dim=1)
        if not recurrent:  # DT: a sliding window
            rtg_hist, obs_hist, act_hist = rtg_hist[:, -window:], obs_hist[:, -window:], act_hist[:, -window:]
        logits, _ = model(rtg_hist, obs_hist, act_hist, state)
        logits = logits[:, -1]
        if sample:
            action = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        else:
            action = logits.argmax(-1)
        act_hist[:, -1] = action
        obs, reward, terminated, truncated, info = vector_env.step(action.cpu().numpy())
        active = ~done
        returns[active] += reward[active]
        lengths[active] += 1
        if "success" in info:
            successes[active] |= np.asarray(info["success"])[active]
        done |= np.asarray(terminated) | np.asarray(truncated)
        rtg = rtg - torch.as_tensor(reward, device=device, dtype=torch.float32)
        step += 1
        if recurrent and act_hist.shape[1] == window:  # segment finished: update memory and cache
            _, state = model(rtg_hist, obs_hist, act_hist, state)
            rtg_hist, obs_hist, act_hist = rtg_hist[:, :0], obs_hist[:, :0], act_hist[:, :0]
        if progress is not None:
            progress(step)
    return EpisodeBatch(returns, lengths, successes)
