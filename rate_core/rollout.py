"""Run a model in many environments in lockstep, on the model's device.

Segment-recurrent modes (rate, rmt, trxl) act inside a segment of K steps with cached keys and
values: each step computes only its new tokens (the previous action, R_t, o_t). When a segment is
full, one more pass over the finished segment (its last action included, exactly as in training)
produces the next memory (through the MRV) and Transformer-XL cache. DT acts from a sliding window
of its last K * N steps, recomputed every step (a multi-layer sliding window cannot be cached
exactly), batched over environments.

Environments that finish early drop out of the batch, so the model only works for the running
ones. Sampled actions use one random stream per environment (seeded by the sampling seed and the
environment's seed), so an episode does not depend on which other episodes share its batch.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from rate_core.model import ACTION_PAD, MemoryTransformer


class SegmentRecurrentPolicy:
    """Acts for a batch of envs step by step with cached keys and values (rate, rmt, trxl).

    memory_horizon H: at every segment boundary, rebuild the memory and cache from the initial state
    over only the last H - 1 finished segments, so that no step sees anything from more than H
    segments back (None: carry them over the whole episode, as trained and as the protocols do).
    It measures how far back a model's memory reaches."""

    def __init__(self, model: MemoryTransformer, num_envs: int, need_weights: bool = False,
                 memory_horizon: int | None = None):
        if memory_horizon is not None and memory_horizon < 1:
            raise ValueError(f"memory_horizon counts segments, the current one included: at least 1, "
                             f"got {memory_horizon}")
        self.model = model
        self.need_weights = need_weights
        self.memory_horizon = memory_horizon
        self.segments = []  # with a memory horizon: embedded tokens (B, 3K, d) of the last H - 1 segments
        self.current = []  # with a memory horizon: the current segment's embedded tokens so far
        self.context = model.begin_segment(model.initial_state(num_envs))
        self.steps = 0  # steps of the current segment so far
        self.previous = None  # the previous step's actions, fed as the first token of the next step
        self.memory_attention = None  # (B, n_layer) share of the last step's attention on read memory
        self.aux_probs = None  # (B, aux_classes) the auxiliary head's reading at the last step (None without one)

    def logits(self, rtg: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """rtg (B,), obs (B, *obs_shape) of the current step -> action logits (B, A)."""
        model = self.model
        pad = torch.full((rtg.shape[0], 1), ACTION_PAD, dtype=torch.long, device=rtg.device)
        tokens = model.embed(rtg[:, None], obs[:, None], pad)[:, :2]  # R_t, o_t
        if self.steps:
            tokens = torch.cat([model.action_tokens(self.previous)[:, None], tokens], dim=1)
        if self.memory_horizon is not None:
            self.current.append(tokens)
        want = self.need_weights and model.config.num_mem_tokens > 0
        hidden, weights = model.extend_segment(tokens, self.context, need_weights=want)
        if want:
            read = slice(self.context.cache_len, self.context.cache_len + model.config.num_mem_tokens)
            # the o_t token's query (the last new one) predicts the action; sum over the read
            # tokens, average over heads
            self.memory_attention = torch.stack([w[:, :, -1, read].sum(-1).mean(1) for w in weights], dim=1)
        self.steps += 1
        self.aux_probs = _aux_probs(model, hidden[:, -1])
        return model.head(hidden[:, -1])

    def record_action(self, action: torch.Tensor):
        """Store the chosen actions (B,). At the end of a segment, feed its last action, compute
        the next memory and cache and start the next segment; returns (memory before, memory
        after) (B, m, d) then, else None."""
        self.previous = action
        if self.steps < self.model.config.segment_steps:
            return None
        model = self.model
        last = model.action_tokens(action)[:, None]
        model.extend_segment(last, self.context)
        before = self.context.state.memory
        if self.memory_horizon is None:
            state = model.finish_segment(self.context)
        else:
            keep = self.memory_horizon - 1  # finished segments the next one may draw on
            self.segments = (self.segments + [torch.cat(self.current + [last], dim=1)])[-keep:] if keep else []
            self.current = []
            state = model.replay(self.segments, len(action))
        self.context = model.begin_segment(state)
        self.steps = 0
        return None if before is None else (before, state.memory)

    def select(self, index: torch.Tensor) -> None:
        """Keep only these batch rows (the envs still running)."""
        self.context.select(index)
        if self.previous is not None:
            self.previous = self.previous[index]
        self.segments = [tokens[index] for tokens in self.segments]
        self.current = [tokens[index] for tokens in self.current]


class SlidingWindowPolicy:
    """DT: recomputes its window of the last K * N steps at every step, batched over envs. Each
    step's tokens are embedded once (the observation encoder is per step), only the transformer
    runs over the whole window."""

    def __init__(self, model: MemoryTransformer, num_envs: int, need_weights: bool = False):
        self.model = model
        self.steps = []  # per step in the window: its (B, 3, d) tokens R, o, a
        self.memory_attention = None
        self.aux_probs = None

    def logits(self, rtg: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        pad = torch.full((rtg.shape[0], 1), ACTION_PAD, dtype=torch.long, device=rtg.device)
        self.steps.append(self.model.embed(rtg[:, None], obs[:, None], pad))
        del self.steps[: -self.model.config.segment_steps]
        output = self.model.last_step_output_from_tokens(torch.cat(self.steps, dim=1))
        self.aux_probs = _aux_probs(self.model, output)
        return self.model.head(output)

    def record_action(self, action: torch.Tensor):
        last = self.steps[-1].clone()
        last[:, 2] = self.model.action_tokens(action)
        self.steps[-1] = last
        return None

    def select(self, index: torch.Tensor) -> None:
        self.steps = [tokens[index] for tokens in self.steps]


def _aux_probs(model: MemoryTransformer, output: torch.Tensor) -> torch.Tensor | None:
    """Softmax of the auxiliary head (ModelConfig.aux_classes) on step outputs (B, d), or None without one."""
    return None if model.aux_head is None else model.aux_head(output).float().softmax(-1)


def make_policy(model: MemoryTransformer, num_envs: int, need_weights: bool = False,
                memory_horizon: int | None = None):
    """The step-by-step policy of the model's mode; memory_horizon: see SegmentRecurrentPolicy."""
    if model.config.mode != "dt":
        return SegmentRecurrentPolicy(model, num_envs, need_weights, memory_horizon)
    if memory_horizon is not None:
        raise ValueError("a memory horizon is for models that carry memory or a cache across segments "
                         "(rate, rmt, trxl); DT sees a fixed window of K * N steps")
    return SlidingWindowPolicy(model, num_envs, need_weights)


@dataclass
class EpisodeTrace:
    """Everything recorded about one episode of T steps (what the app shows)."""

    seed: int
    actions: np.ndarray
    """(T,) chosen actions"""
    logits: np.ndarray
    """(T, A) action logits"""
    probs: np.ndarray
    """(T, A) action probabilities: softmax of the logits divided by the rollout's temperature (1 by default)"""
    rewards: np.ndarray
    """(T,) rewards"""
    returns_to_go: np.ndarray
    """(T,) return-to-go given to the model at each step"""
    reset_info: dict
    """task info at reset (e.g. the T-Maze cue)"""
    info: dict
    """per info key of the env's step, a (T,) array (e.g. success, health)"""
    segment_steps: int
    """K: a segment boundary falls before every step that is a multiple of it (DT: its window)"""
    memory: np.ndarray | None
    """(U + 1, m, d) memory tokens: the initial ones, then after each of the U updates (None without memory)"""
    memory_update_steps: list = field(default_factory=list)
    """the step after which each memory update happened"""
    memory_attention: np.ndarray | None = None
    """(T, n_layer) attention share of each step's o_t query on the read memory tokens, averaged over heads"""
    aux_probs: np.ndarray | None = None
    """(T, aux_classes) what the auxiliary head (train --aux-weight) reads at each step: the class
    probabilities of what must be remembered (None for a model without one)"""
    frames: np.ndarray | None = None
    """(T + 1, H, W, 3) uint8 rendered frames: before each step and after the last (when asked)"""
    observations: np.ndarray | None = None
    """(T + 1, *obs_shape) observations (when asked)"""
    memory_horizon: int | None = None
    """the segments memory and cache reached back over (run_episodes' memory_horizon; None: the whole episode)"""
    cut_short: bool = False
    """the episode was stopped by run_episodes' max_steps before the env ended it (no verdict yet)"""
    sliding_window: bool = False
    """the model acts on a sliding window of its last segment_steps steps (DT), not in segments"""

    @property
    def length(self) -> int:
        return len(self.actions)

    @property
    def total_return(self) -> float:
        return float(self.rewards.sum())

    @property
    def success(self) -> bool:
        return bool(np.any(self.info.get("success", False)))


@dataclass
class EpisodeBatch:
    """Outcome of lockstep episodes: one entry per environment."""

    returns: np.ndarray
    lengths: np.ndarray
    successes: np.ndarray
    traces: list[EpisodeTrace] | None = None
    model_steps: int = 0
    """batch rows the model processed in total (sum over steps of the running envs)"""
    reset_info: dict = field(default_factory=dict)
    """per-env task info at reset (numbers per env, e.g. the cue), as arrays"""


def _per_env(value, num: int) -> bool:
    return isinstance(value, np.ndarray) and value.shape[:1] == (num,) and value.ndim == 1


class _Recorder:
    """Collects traces of all envs, step by step."""

    def __init__(self, model, seeds, reset_info, num, frames, observations, memory_horizon=None):
        self.model, self.seeds, self.num, self.memory_horizon = model, list(seeds), num, memory_horizon
        self.want_frames, self.want_obs = frames, observations
        self.cut_short = np.zeros(num, dtype=bool)
        self.steps = [dict(actions=[], logits=[], probs=[], rewards=[], rtg=[], info={}, memory=[], updates=[],
                           attention=[], aux=[], frames=[], obs=[]) for _ in range(num)]
        self.reset_info = [{k: v[i].item() for k, v in reset_info.items() if _per_env(v, num)} for i in range(num)]
        if model.initial_memory is not None:
            for rec in self.steps:
                rec["memory"].append(model.initial_memory.detach().float().cpu().numpy())

    def observe(self, ids, obs, frames):
        for i in ids:
            if self.want_obs:
                self.steps[i]["obs"].append(np.asarray(obs[i]).copy())
            if self.want_frames:
                self.steps[i]["frames"].append(frames[i])

    def act(self, ids, rtg, logits, probs, actions, attention, aux=None):
        for row, i in enumerate(ids):
            rec = self.steps[i]
            rec["rtg"].append(rtg[row])
            rec["logits"].append(logits[row])
            rec["probs"].append(probs[row])
            rec["actions"].append(actions[row])
            if attention is not None:
                rec["attention"].append(attention[row])
            if aux is not None:
                rec["aux"].append(aux[row])

    def memory_update(self, ids, step, after):
        for row, i in enumerate(ids):
            self.steps[i]["memory"].append(after[row])
            self.steps[i]["updates"].append(step)

    def result(self, ids, reward, info):
        for i in ids:
            rec = self.steps[i]
            rec["rewards"].append(float(reward[i]))
            for key, value in info.items():
                if key != "active" and _per_env(value, self.num):
                    rec["info"].setdefault(key, []).append(value[i].item())

    def traces(self) -> list[EpisodeTrace]:
        out = []
        for seed, reset_info, rec, cut_short in zip(self.seeds, self.reset_info, self.steps, self.cut_short,
                                                    strict=True):
            out.append(EpisodeTrace(
                seed=seed, actions=np.array(rec["actions"], dtype=np.int64),
                logits=np.array(rec["logits"], dtype=np.float32).reshape(len(rec["actions"]), -1),
                probs=np.array(rec["probs"], dtype=np.float32).reshape(len(rec["actions"]), -1),
                rewards=np.array(rec["rewards"], dtype=np.float32),
                returns_to_go=np.array(rec["rtg"], dtype=np.float32), reset_info=reset_info,
                info={k: np.array(v) for k, v in rec["info"].items()},
                segment_steps=self.model.config.segment_steps,
                memory=np.array(rec["memory"]) if rec["memory"] else None, memory_update_steps=rec["updates"],
                memory_attention=np.array(rec["attention"]) if rec["attention"] else None,
                aux_probs=np.array(rec["aux"], dtype=np.float32) if rec["aux"] else None,
                frames=np.array(rec["frames"]) if rec["frames"] else None,
                observations=np.array(rec["obs"]) if rec["obs"] else None, memory_horizon=self.memory_horizon,
                cut_short=bool(cut_short), sliding_window=self.model.config.mode == "dt",
            ))
        return out


def _render_all(vector_env, num: int):
    frames = vector_env.render()
    if frames is None or len(frames) != num:
        raise ValueError("frames were asked for, but the environment's render() gave none: create it with "
                         "render_mode='rgb_array'")
    return frames


def sample_actions(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Actions (B,) drawn from probs (B, A) by inverting the cumulative distribution at uniform (B,) in [0, 1):
    the first action whose cumulative probability reaches the uniform draw. A draw above a cumulative sum
    that rounding left short of 1 takes the last action of nonzero probability, a draw of exactly 0 the
    first one (never one of probability 0)."""
    drawn = (probs.cumsum(-1) < uniform[:, None].to(probs.dtype)).sum(-1)
    first_possible = (probs > 0).int().argmax(-1)
    last_possible = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(torch.maximum(drawn, first_possible), last_possible)


@torch.no_grad()
def run_episodes(model: MemoryTransformer, vector_env, seeds, target_return, sample: bool = False,
                 sample_seed: int = 0, max_steps: int | None = None, progress=None, trace: bool = False,
                 temperature: float = 1.0, frames: bool = False, observations: bool = False,
                 memory_horizon: int | None = None, hide_actions: float = 0.0,
                 pixel_noise: float = 0.0) -> EpisodeBatch:
    """Play one episode in each env of `vector_env` (autoreset disabled), seeded by `seeds`.

    target_return: return-to-go at the first step, one number or one per env (then
    R_{t+1} = R_t - r_t); sample: draw actions from softmax(logits / temperature) instead of the
    argmax, with per-env random streams seeded by (sample_seed, env seed); max_steps: stop after
    this many steps (default: when every env is done); progress: optional callable(step) for
    progress bars; trace: record an EpisodeTrace per env (frames and observations only when asked;
    frames need an env made with render_mode='rgb_array'); memory_horizon: see SegmentRecurrentPolicy;
    hide_actions: the probability with which each chosen action is fed back to the model as the
    unknown-action token (as train --action-dropout hides them in training; the env still takes it),
    drawn per env from a stream seeded by (sample_seed, env seed, 1); pixel_noise: the probability with
    which each value of an image observation is moved one level up or down before the model sees it
    (clipped to 0-255; drawn per env from a stream seeded by (sample_seed, env seed, 2); traces keep
    the env's own observations): how much a model's score rests on frames exactly as its data's, as
    another renderer's (a GPU's) differ by a level here and there.
    """
    check_rollout(model, vector_env, target_return, max_steps, temperature, hide_actions, pixel_noise, seeds,
                  sample_seed)
    training = model.training
    model.eval()
    try:
        return _play(model, vector_env, seeds, target_return, sample, sample_seed, max_steps, progress, trace,
                     temperature, frames, observations, memory_horizon, hide_actions, pixel_noise)
    finally:
        model.train(training)  # as the caller had it (a model evaluated during training goes on training)


def nudge_pixels(frame: np.ndarray, rng: np.random.Generator, probability: float) -> np.ndarray:
    """`frame` (uint8) with each value moved one level up or down with `probability`, clipped to 0-255."""
    hit = rng.random(frame.shape) < probability
    step = rng.integers(0, 2, frame.shape, dtype=np.int16) * 2 - 1
    return np.clip(frame.astype(np.int16) + hit * step, 0, 255).astype(np.uint8)


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_rollout(model: MemoryTransformer, vector_env, target_return, max_steps, temperature, hide_actions,
                  pixel_noise: float = 0.0, seeds=(0,), sample_seed: int = 0) -> None:
    """Raise ValueError, saying what to pass, for arguments of run_episodes that would fail deep in
    the model or the env, or give a silently wrong result (a temperature of 0 gives NaN probabilities)."""
    if not hasattr(vector_env, "num_envs"):
        raise ValueError(f"run_episodes needs a vector env (task.make_vector_env(n)), got {type(vector_env).__name__}")
    if vector_env.num_envs < 1:
        raise ValueError("run_episodes needs at least one env, got a vector env of 0")
    c = model.config
    space, actions = (getattr(vector_env, name, None) for name in ("single_observation_space", "single_action_space"))
    if space is not None and actions is not None and (tuple(space.shape) != c.obs_shape
                                                      or getattr(actions, "n", None) != c.act_dim):
        raise ValueError(f"the model ({model.task or 'no task'}: observations {c.obs_shape}, {c.act_dim} actions) does "
                         f"not fit the env (observations {tuple(space.shape)}, action space {actions}): use the "
                         f"task's own checkpoint and env")
    targets = np.asarray(target_return, dtype=np.float64)
    if targets.ndim > 1 or targets.size not in (1, vector_env.num_envs) or not np.isfinite(targets).all():
        raise ValueError(f"target_return: one finite number or one per env ({vector_env.num_envs}), "
                         f"got {target_return!r}")
    if max_steps is not None and not (_whole(max_steps) and max_steps >= 1):
        raise ValueError(f"max_steps must be a whole number, at least 1 (None: play to the end), got {max_steps!r}")
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or len(seeds) != vector_env.num_envs or not all(
            _whole(seed) and seed >= 0 for seed in seeds):
        raise ValueError(f"seeds: one whole number from 0 per env ({vector_env.num_envs}), e.g. "
                         f"range({vector_env.num_envs}), got {seeds!r}")
    if not (_whole(sample_seed) and sample_seed >= 0):
        raise ValueError(f"sample_seed must be a whole number from 0, got {sample_seed!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number (1: the model's own probabilities), got {temperature}")
    if not 0.0 <= hide_actions <= 1.0:
        raise ValueError(f"hide_actions is a probability in [0, 1], got {hide_actions}")
    check_pixel_noise(model, pixel_noise)


def check_pixel_noise(model: MemoryTransformer, pixel_noise: float, name: str = "pixel_noise") -> None:
    """ValueError unless `pixel_noise` (called `name` in the message) is a probability the model can take:
    any nonzero one needs image observations."""
    if not 0.0 <= pixel_noise <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {pixel_noise}")
    kind = model.config.obs_kind
    if pixel_noise and kind != "image":
        raise ValueError(f"{name} needs image observations; {model.task or 'this model'}'s are {kind}s")


def _play(model, vector_env, seeds, target_return, sample, sample_seed, max_steps, progress, trace, temperature,
          frames, observations, memory_horizon, hide_actions, pixel_noise) -> EpisodeBatch:
    """run_episodes' loop, its arguments checked and the model in eval mode."""
    device = next(model.parameters()).device
    num = vector_env.num_envs
    seeds = list(seeds)
    obs, reset_info = vector_env.reset(seed=seeds)
    obs_dtype = torch.uint8 if model.config.obs_kind == "image" else torch.float32
    policy = make_policy(model, num, need_weights=trace, memory_horizon=memory_horizon)
    rtg_all = np.broadcast_to(np.asarray(target_return, dtype=np.float64), (num,)).copy()
    rngs = [np.random.default_rng([sample_seed, int(s)]) for s in seeds] if sample else None
    hide_rngs = [np.random.default_rng([sample_seed, int(s), 1]) for s in seeds] if hide_actions else None
    noise_rngs = [np.random.default_rng([sample_seed, int(s), 2]) for s in seeds] if pixel_noise else None
    recorder = _Recorder(model, seeds, reset_info, num, frames, observations, memory_horizon) if trace else None
    returns = np.zeros(num)
    lengths = np.zeros(num, dtype=np.int64)
    successes = np.zeros(num, dtype=bool)
    ids = np.arange(num)  # envs still running, in the order of the policy's batch rows
    full_actions = np.zeros(num, dtype=np.int64)
    step, model_steps = 0, 0
    while len(ids) and (max_steps is None or step < max_steps):
        if recorder is not None:
            recorder.observe(ids, obs, _render_all(vector_env, num) if frames else None)
        rtg = torch.as_tensor(rtg_all[ids], dtype=torch.float32, device=device)
        seen = np.asarray(obs)[ids]
        if noise_rngs is not None:
            seen = np.stack([nudge_pixels(frame, noise_rngs[i], pixel_noise)
                             for frame, i in zip(seen, ids, strict=True)])
        logits = policy.logits(rtg, torch.as_tensor(seen, device=device).to(obs_dtype))
        model_steps += len(ids)
        probs = (logits.float() / temperature).softmax(-1)
        if sample:
            uniform = torch.as_tensor([rngs[i].random() for i in ids], dtype=torch.float32, device=device)
            action = sample_actions(probs, uniform)
        else:
            action = logits.argmax(-1)
        attention, aux = policy.memory_attention, policy.aux_probs
        fed = action
        if hide_rngs is not None:
            hide = torch.as_tensor([hide_rngs[i].random() < hide_actions for i in ids], device=device)
            fed = torch.where(hide, torch.full_like(action, ACTION_PAD), action)
        update = policy.record_action(fed)
        action_np = action.cpu().numpy()
        if recorder is not None:
            recorder.act(ids, rtg_all[ids].copy(), logits.float().cpu().numpy(), probs.float().cpu().numpy(), action_np,
                         None if attention is None else attention.float().cpu().numpy(),
                         None if aux is None else aux.float().cpu().numpy())
            if update is not None:
                recorder.memory_update(ids, step, update[1].float().cpu().numpy())
        full_actions[:] = 0
        full_actions[ids] = action_np
        obs, reward, terminated, truncated, info = vector_env.step(full_actions)
        reward = np.asarray(reward, dtype=np.float64)
        returns[ids] += reward[ids]
        lengths[ids] += 1
        if "success" in info:
            successes[ids] |= np.asarray(info["success"], dtype=bool)[ids]
        rtg_all[ids] -= reward[ids]
        if recorder is not None:
            recorder.result(ids, reward, info)
        finished = (np.asarray(terminated) | np.asarray(truncated))[ids]
        step += 1
        if finished.any():
            if recorder is not None:  # the frame after the last step
                recorder.observe(ids[finished], obs, _render_all(vector_env, num) if frames else None)
            keep = np.flatnonzero(~finished)
            ids = ids[keep]
            if len(ids):
                policy.select(torch.as_tensor(keep, device=device))
        if progress is not None:
            progress(step)
    if recorder is not None and len(ids):  # stopped by max_steps
        recorder.observe(ids, obs, _render_all(vector_env, num) if frames else None)
        recorder.cut_short[ids] = True
    start_info = {k: np.asarray(v) for k, v in reset_info.items() if _per_env(np.asarray(v), num)}
    return EpisodeBatch(returns, lengths, successes, recorder.traces() if recorder else None, model_steps, start_info)
