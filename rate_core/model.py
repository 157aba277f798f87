"""The memory transformer: one module for RATE, RMT, TrXL and DT (README, "The model").

A trajectory is a sequence of (return-to-go R_t, observation o_t, action a_t) steps. Each step
becomes three tokens R, o, a. A segment of T steps is processed as

    [read memory (m) | 3T trajectory tokens | write memory (m)]

by a stack of post-LN Transformer-XL layers with relative positions (no absolute timestep
embedding). The action a_t is predicted from the output at the o_t token. The outputs at the write
positions, passed through the Memory Retention Valve (MRV), become the memory of the next segment.
Each layer can also keep a Transformer-XL cache of `mem_len` past hidden inputs.

The four modes are configurations of the same class:
    rate: memory tokens, MRV (n_head_ca > 0), cache optional
    rmt:  memory tokens, no MRV (memory = write outputs), no cache
    trxl: no memory tokens, cache only
    dt:   no memory, no cache, one window of K*N steps
"""

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch.utils.checkpoint import checkpoint

from rate_core.attention import relative_attention, relative_attention_inference, sinusoid

MODES = ("rate", "rmt", "trxl", "dt")
OBS_KINDS = ("vector", "image")
MRV_ACTIVATIONS = ("relu", "leaky_relu", "tanh", "none")
INT_FIELDS = ("act_dim", "context_length", "sections", "d_model", "n_layer", "n_head", "d_head", "d_inner",
              "num_mem_tokens", "mem_len", "n_head_ca", "aux_classes")
ACTION_PAD = -10  # action value that marks padding in datasets and the unknown current action
MIN_IMAGE_SIDE = 36  # the image encoder's convolutions (8 stride 4, 4 stride 2, 3) need at least 36 pixels


def _is_whole(value) -> bool:
    """An integer, numpy's too (not a bool, and not 4.0: a config says what it means)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


@dataclass
class ModelConfig:
    """Architecture of a MemoryTransformer. Defaults: the paper's T-Maze RATE (its hyperparameter tables)."""

    mode: str = "rate"
    """how memory flows: rate | rmt | trxl | dt"""
    obs_kind: str = "vector"
    """vector (float observations of shape (D,)) or image (uint8 (3, H, W))"""
    obs_shape: tuple[int, ...] = (4,)
    """shape of one observation"""
    act_dim: int = 4
    """number of discrete actions"""
    context_length: int = 50
    """K: steps per segment (DT: its window is K * sections steps)"""
    sections: int = 3
    """N: segments per training sample"""
    d_model: int = 64
    """width of every token"""
    n_layer: int = 8
    """number of transformer layers"""
    n_head: int = 8
    """attention heads per layer"""
    d_head: int = 64
    """width of one attention head (independent of d_model)"""
    use_ffn: bool = False
    """whether each layer has a feed-forward block after attention"""
    d_inner: int = 128
    """hidden width of the feed-forward block"""
    dropout: float = 0.2
    """dropout on inputs, sublayer outputs and the final output"""
    dropatt: float = 0.1
    """dropout on attention probabilities (MRV included)"""
    num_mem_tokens: int = 10
    """m: memory tokens (0 for trxl and dt)"""
    mem_len: int = 0
    """Transformer-XL cache length per layer, in tokens (0: no cache)"""
    n_head_ca: int = 2
    """heads of the Memory Retention Valve (0: no MRV, memory = write outputs)"""
    mrv_act: str = "relu"
    """activation applied to the write outputs before the MRV"""
    conv_channels: tuple[int, int, int] = (32, 64, 64)
    """channels of the three image-encoder convolutions (smaller for CPU training)"""
    action_inputs: bool = True
    """whether the actions taken are inputs; False: every action token is the padding embedding, a
    policy on returns and observations alone (a cloned policy cannot copy its own past actions)"""
    aux_classes: int = 0
    """classes of the auxiliary head (0: none): a linear layer on each step's output, next to the
    action head, trained to predict what the agent must remember (Task.aux_label, `train
    --aux-weight`); acting does not use it"""

    def __post_init__(self):
        # JSON gives lists; keep tuples so configs compare equal after a round trip. Numbers become plain
        # ints and floats (numpy's, e.g. a gym space's Discrete.n, too), so the config saves as JSON.
        for name in ("obs_shape", "conv_channels"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(
                    _is_whole(v) for v in value):
                raise ValueError(f"invalid ModelConfig: {name} must be a sequence of whole numbers, got {value!r}")
            setattr(self, name, tuple(int(v) for v in value))
        for name in INT_FIELDS:
            if _is_whole(getattr(self, name)):
                setattr(self, name, int(getattr(self, name)))
        for name in ("dropout", "dropatt"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
                setattr(self, name, float(value))
        for name in ("use_ffn", "action_inputs"):
            if isinstance(getattr(self, name), np.bool_):
                setattr(self, name, bool(getattr(self, name)))
        self.validate()

    def validate(self):
        """Raise ValueError naming the field when the configuration is inconsistent."""

        def check(ok, message):
            if not ok:
                raise ValueError(f"invalid ModelConfig: {message}")

        for name in INT_FIELDS:
            check(_is_whole(getattr(self, name)), f"{name} must be a whole number, got {getattr(self, name)!r}")
        for name in ("use_ffn", "action_inputs"):
            check(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("dropout", "dropatt"):
            value = getattr(self, name)
            check(isinstance(value, float) and 0 <= value < 1,
                  f"{name} is a probability in [0, 1), got {value!r}")
        check(self.mode in MODES, f"mode={self.mode!r}, expected one of {MODES}")
        check(self.obs_kind in OBS_KINDS, f"obs_kind={self.obs_kind!r}, expected one of {OBS_KINDS}")
        check(self.mrv_act in MRV_ACTIVATIONS, f"mrv_act={self.mrv_act!r}, expected one of {MRV_ACTIVATIONS}")
        if self.obs_kind == "vector":
            check(len(self.obs_shape) == 1, f"vector observations need obs_shape=(D,), got {self.obs_shape}")
        else:
            check(len(self.obs_shape) == 3 and self.obs_shape[0] == 3,
                  f"image observations need obs_shape=(3, H, W), got {self.obs_shape}")
            check(min(self.obs_shape[1:]) >= MIN_IMAGE_SIDE, f"image observations need H and W >= {MIN_IMAGE_SIDE} "
                  f"(the encoder's three convolutions), got obs_shape={self.obs_shape}")
            check(len(self.conv_channels) == 3 and min(self.conv_channels) >= 1,
                  f"conv_channels: three channel counts >= 1 (one per convolution), got {self.conv_channels}")
        check(min(self.obs_shape) >= 1, f"obs_shape sizes must be >= 1, got {self.obs_shape}")
        if self.use_ffn:
            check(self.d_inner >= 1, f"use_ffn needs d_inner >= 1, got {self.d_inner}")
        for name in ("act_dim", "context_length", "sections", "d_model", "n_layer", "n_head", "d_head"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.d_model % 2 == 0, f"d_model must be even (the relative position embedding pairs a sine and a "
              f"cosine per frequency), got {self.d_model}")
        for name in ("num_mem_tokens", "mem_len", "n_head_ca", "aux_classes"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        m, mem_len, ca = self.num_mem_tokens, self.mem_len, self.n_head_ca
        if self.mode == "rate":
            check(m > 0, "mode rate needs num_mem_tokens > 0")
        elif self.mode == "rmt":
            check(m > 0 and mem_len == 0 and ca == 0, "mode rmt needs num_mem_tokens > 0, mem_len = 0, n_head_ca = 0")
        elif self.mode == "trxl":
            check(m == 0 and mem_len > 0 and ca == 0, "mode trxl needs num_mem_tokens = 0, mem_len > 0, n_head_ca = 0")
        else:
            check(m == 0 and mem_len == 0 and ca == 0, "mode dt needs num_mem_tokens = 0, mem_len = 0, n_head_ca = 0")
        if ca > 0:
            check(self.d_model % ca == 0, f"d_model={self.d_model} must be divisible by n_head_ca={ca}")

    @property
    def segment_steps(self) -> int:
        """Steps the model sees in one forward pass: K, or K * N for DT's single window."""
        return self.context_length * self.sections if self.mode == "dt" else self.context_length


class MemoryState(NamedTuple):
    """What one segment hands to the next.

    memory: (B, m, d_model) memory tokens, or None when m = 0.
    cache: one (B, L, d_model) tensor of past hidden inputs per layer (L <= mem_len), or None.
    """

    memory: torch.Tensor | None
    cache: tuple[torch.Tensor, ...] | None


class KeyValueBuffer:
    """Key and value rows of one layer during incremental inference, preallocated so that each step
    writes its new rows in place instead of copying everything seen so far."""

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None, rows: int, capacity: int, d_head: int,
                 like: torch.Tensor):
        self.keys = like.new_empty(rows, capacity, d_head)
        self.values = like.new_empty(rows, capacity, d_head)
        self.length = 0
        if prefix is not None:
            self.append(*prefix)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (rows, n, dh) keys and values; returns views of all rows so far."""
        end = self.length + key.shape[1]
        self.keys[:, self.length:end] = key
        self.values[:, self.length:end] = value
        self.length = end
        return self.keys[:, :end], self.values[:, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (e.g. of the environments still running)."""
        self.keys = self.keys[rows]
        self.values = self.values[rows]


class SegmentContext:
    """What incremental inference keeps while a segment fills up, step by step.

    state: the memory and cache the segment started from; prefix_len: positions every segment
    token sees before the segment's own (XL cache + read memory), of which cache_len are the XL
    cache; buffers: per-layer keys and values so far (None until the batch size is known);
    position_keys: per layer, (H, W, dh) projected embeddings of the distances top down to
    -(m - 1), computed once per segment; mask: the segment's full attention mask; inputs: per
    layer, the hidden inputs so far (only when an XL cache must be built); done: trajectory
    tokens processed so far."""

    def __init__(self, state, buffers, position_keys, top, mask, prefix_len, cache_len, n_head, inputs):
        self.state, self.buffers, self.position_keys, self.top, self.mask = state, buffers, position_keys, top, mask
        self.prefix_len, self.cache_len, self.n_head, self.inputs = prefix_len, cache_len, n_head, inputs
        self.done = 0

    def position_key(self, layer: int, key_len: int, lowest: int = 0) -> torch.Tensor:
        """(H, W, dh) position keys for distances key_len - 1 down to `lowest`."""
        return self.position_keys[layer][:, self.top - (key_len - 1): self.top - lowest + 1]

    def select(self, batch_index: torch.Tensor) -> None:
        """Keep only these batch entries (e.g. the environments still running)."""
        memory, cache = self.state
        self.state = MemoryState(None if memory is None else memory[batch_index],
                                 None if cache is None else tuple(c[batch_index] for c in cache))
        rows = (batch_index[:, None] * self.n_head + torch.arange(self.n_head, device=batch_index.device)).reshape(-1)
        if self.buffers[0] is not None:
            for buffer in self.buffers:
                buffer.select(rows)
        if self.inputs is not None:
            self.inputs = [[x[batch_index] for x in layer] for layer in self.inputs]


class RelativeAttentionLayer(nn.Module):
    """One post-LN Transformer-XL layer: relative multi-head attention, then an optional FFN."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.d_head = config.n_head, config.d_head
        inner = config.n_head * config.d_head
        self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.pos_proj = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=False)
        self.attn_norm = nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.dropatt = config.dropatt
        self.ffn = None
        if config.use_ffn:
            self.ffn = nn.Sequential(
                nn.Linear(config.d_model, config.d_inner), nn.ReLU(), nn.Dropout(config.dropout),
                nn.Linear(config.d_inner, config.d_model), nn.Dropout(config.dropout),
            )
            self.ffn_norm = nn.LayerNorm(config.d_model)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, H, dh) -> (B * H, L, dh), the layout of relative_attention."""
        return t.transpose(1, 2).reshape(-1, t.shape[1], self.d_head)

    def key_values(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value rows (B * H, L, dh) of hidden inputs (B, L, d), e.g. the Transformer-XL cache."""
        inner = self.n_head * self.d_head
        projected = F.linear(hidden, self.qkv.weight[inner:]).view(*hidden.shape[:2], 2, self.n_head, self.d_head)
        key, value = projected.unbind(2)
        return self.rows(key), self.rows(value)

    def position_keys(self, pos_emb: torch.Tensor) -> torch.Tensor:
        """(W, d) position embeddings -> (H, W, dh) position keys of this layer."""
        return self.pos_proj(pos_emb).view(-1, self.n_head, self.d_head).transpose(0, 1)

    def forward(self, x, past, pos_emb, content_bias, position_bias, allowed, position_key=None, need_weights=False):
        """x: (B, Q, d) inputs at the newest Q positions; past: key and value rows (B * H, P, dh) of
        the P positions before them (XL cache, read memory, earlier tokens), a KeyValueBuffer holding
        them (the new rows are appended in place), or None; pos_emb:
        (W, d) embeddings of the distances P + Q - 1 down to P + Q - W; content_bias, position_bias:
        (H, d_head); allowed: (Q, P + Q) bool, True where query i may attend to key j.
        position_key: this layer's position_keys(pos_emb), when the caller has them already.
        Returns the output (B, Q, d), the key and value rows (B * H, Q, dh) of the new positions and,
        with need_weights (inference only), the attention probabilities (B, H, Q, P + Q), else None."""
        batch, q_len, _ = x.shape
        # unbind, not indexing: the backward of each index would zero-fill the whole projection.
        query, key, value = self.qkv(x).view(batch, q_len, 3, self.n_head, self.d_head).unbind(2)
        key, value = self.rows(key), self.rows(value)
        if past is None:
            keys, values = key, value
        elif isinstance(past, KeyValueBuffer):
            keys, values = past.append(key, value)
        else:
            keys, values = torch.cat([past[0], key], 1), torch.cat([past[1], value], 1)
        if position_key is None:
            position_key = self.position_keys(pos_emb)
        scale = 1.0 / math.sqrt(self.d_head)
        weights = None
        if torch.is_grad_enabled() or (self.training and self.dropatt):
            attended = relative_attention(self.rows(query), keys, values, content_bias, position_bias, position_key,
                                          allowed, scale=scale, dropout=self.dropatt if self.training else 0.0)
        else:
            attended, weights = relative_attention_inference(self.rows(query), keys, values, content_bias,
                                                             position_bias, position_key, allowed, scale, need_weights)
            if weights is not None:
                weights = weights.view(batch, self.n_head, q_len, -1)
        attended = attended.view(batch, self.n_head, q_len, self.d_head).transpose(1, 2).reshape(batch, q_len, -1)

        x = self.attn_norm(x + self.drop(self.out(attended)))
        if self.ffn is not None:
            x = self.ffn_norm(x + self.ffn(x))
        return x, (key, value), weights


class ImageEncoder(nn.Module):
    """(B, 3, H, W) uint8 -> (B, d_model): three convolutions, flatten, Linear, Tanh."""

    def __init__(self, obs_shape, d_model, channels):
        super().__init__()
        c1, c2, c3 = channels
        self.convs = nn.Sequential(
            nn.Conv2d(3, c1, 8, stride=4), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, *obs_shape)).shape[1]
        self.proj = nn.Sequential(nn.Linear(flat, d_model), nn.Tanh())

    def forward(self, images):
        # Views repeat a lot in grid worlds (a corridor looks the same at every cell): encode each
        # distinct image of the batch once. Exact: the rows are compared, not just hashed, and the
        # gradient of a repeated image sums over its uses as it would without the shortcut.
        distinct = _distinct_images(images) if images.shape[0] >= 32 else None
        if distinct is not None:
            first, inverse = distinct
            return self._encode(images[first])[inverse]
        return self._encode(images)

    def _encode(self, images):
        return self.proj(self.convs(images.to(self.proj[0].weight.dtype) / 255.0))


_HASH_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _distinct_images(images: torch.Tensor, worth_below: float = 0.75):
    """(first, inverse) such that images == images[first][inverse], when the batch has few enough
    distinct images (< worth_below of it) for encoding them alone to pay; else None."""
    count = images.shape[0]
    flat = images.reshape(count, -1)
    if flat.shape[1] % 8:
        return None
    try:
        words = flat.contiguous().view(torch.int64)
    except RuntimeError:  # storage not 8-byte aligned
        return None
    key = (words.shape[1], str(words.device))
    if key not in _HASH_WEIGHTS:
        generator = torch.Generator().manual_seed(words.shape[1])
        weights = torch.randint(-2**62, 2**62, (words.shape[1],), generator=generator) | 1
        _HASH_WEIGHTS[key] = weights.to(words.device)
    hashes = (words * _HASH_WEIGHTS[key]).sum(1)  # int64 arithmetic wraps around
    unique, inverse = torch.unique(hashes, return_inverse=True)
    if unique.numel() >= worth_below * count:
        return None
    positions = torch.arange(count, device=images.device)
    first = torch.full((unique.numel(),), count, device=images.device).scatter_reduce_(0, inverse, positions, "amin")
    if not torch.equal(flat, flat[first[inverse]]):  # a hash collision: rare, stay exact
        return None
    return first, inverse


class MemoryTransformer(nn.Module, PyTorchModelHubMixin, library_name="rate_core", tags=["offline-rl", "rate"]):
    """RATE, RMT, TrXL or DT, by `model_config.mode`.

    `task` names the task the weights were trained on and `training` holds free-form metadata
    (dataset, epochs, ...); both are stored in config.json next to the model config.
    """

    def __init__(self, model_config: ModelConfig, task: str = "", training: dict | None = None):
        super().__init__()
        if isinstance(model_config, dict):
            model_config = ModelConfig(**model_config)
        self.config = model_config
        self.task = task
        self.activation_checkpointing = False  # trade compute for memory in training (not saved)
        self.training_info = dict(training or {})
        c = model_config
        if c.obs_kind == "vector":
            self.obs_encoder = nn.Linear(c.obs_shape[0], c.d_model)
        else:
            self.obs_encoder = ImageEncoder(c.obs_shape, c.d_model, c.conv_channels)
        self.rtg_encoder = nn.Linear(1, c.d_model)
        self.action_encoder = nn.Embedding(c.act_dim + 1, c.d_model, padding_idx=c.act_dim)
        self.initial_memory = nn.Parameter(torch.randn(c.num_mem_tokens, c.d_model)) if c.num_mem_tokens else None
        self.content_bias = nn.Parameter(torch.zeros(c.n_head, c.d_head))
        self.position_bias = nn.Parameter(torch.zeros(c.n_head, c.d_head))
        self.layers = nn.ModuleList(RelativeAttentionLayer(c) for _ in range(c.n_layer))
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.d_model, c.act_dim, bias=False)
        self.mrv = None
        if c.n_head_ca > 0:
            self.mrv = nn.MultiheadAttention(c.d_model, c.n_head_ca, dropout=c.dropatt, batch_first=True)
            self.mrv_proj = nn.Linear(c.d_model, c.d_model)
        self.mrv_act = {"relu": F.relu, "leaky_relu": F.leaky_relu, "tanh": torch.tanh, "none": lambda w: w}[c.mrv_act]
        # made last, so that a seed gives the same other weights with or without it
        self.aux_head = nn.Linear(c.d_model, c.aux_classes) if c.aux_classes else None

    # ----------------------------------------------------------------------------------- state
    def initial_state(self, batch_size: int) -> MemoryState:
        """Memory and cache before the first segment of an episode."""
        memory = None
        if self.initial_memory is not None:
            memory = self.initial_memory.unsqueeze(0).expand(batch_size, -1, -1)
        return MemoryState(memory, None)

    # ------------------------------------------------------------------------------ embedding
    def embed(self, rtg, obs, actions):
        """rtg (B, T) or (B, T, 1) float; obs (B, T, *obs_shape); actions (B, T) long, negative =
        padding (the current, not yet chosen action is padding too). Returns (B, 3T, d) tokens in
        the order R_1, o_1, a_1, R_2, ..."""
        self.check_inputs(rtg, obs, actions)
        batch, steps = actions.shape
        dtype = self.rtg_encoder.weight.dtype  # the weights' (float32 unless the model was converted)
        rtg = rtg.reshape(batch, steps, 1).to(dtype)
        obs = obs.reshape(batch * steps, *self.config.obs_shape)
        obs_tokens = self.obs_encoder(obs.to(dtype) if self.config.obs_kind == "vector" else obs)
        tokens = torch.stack([
            self.rtg_encoder(rtg),
            obs_tokens.view(batch, steps, -1),
            self.action_tokens(actions),
        ], dim=2)
        return tokens.view(batch, 3 * steps, self.config.d_model)

    def check_inputs(self, rtg, obs, actions) -> None:
        """Raise ValueError, saying what was expected, for inputs that the reshapes would otherwise
        take silently or refuse obscurely: observations in another layout (e.g. frames (H, W, 3) as
        envs render them, or time first), float images (already scaled: they would be divided by 255
        again) and returns-to-go that do not match the actions' (B, T)."""
        c = self.config
        if actions.dim() != 2:
            raise ValueError(f"actions must be (B, T), got shape {tuple(actions.shape)}")
        batch, steps = actions.shape
        expected = (batch, steps, *c.obs_shape)
        if tuple(obs.shape) != expected:
            layout = "uint8 frames channels first, (3, H, W)" if c.obs_kind == "image" else "vectors"
            raise ValueError(f"obs must be (B, T, *obs_shape) = {expected} to go with actions of shape "
                             f"{(batch, steps)} ({layout}), got shape {tuple(obs.shape)}")
        if c.obs_kind == "image" and obs.dtype != torch.uint8:
            raise ValueError(f"image observations must be uint8 (0-255; the model scales them), got {obs.dtype}")
        if tuple(rtg.shape) not in ((batch, steps), (batch, steps, 1)):
            raise ValueError(f"rtg must be (B, T) or (B, T, 1) = {(batch, steps)} to go with the actions, "
                             f"got shape {tuple(rtg.shape)}")
        self.check_actions(actions)

    def check_actions(self, actions) -> None:
        """ValueError for an action the model has no token for (act_dim or more: act_dim itself would be
        read as padding); negative values are padding. Only for actions on the CPU: on a GPU, reading
        the highest one would make the host wait for the device at every segment (train_step checks a
        batch's once, with what it reads anyway); skipped while torch.compile traces the model."""
        if actions.numel() and actions.device.type == "cpu" and not torch.compiler.is_compiling():
            highest = int(actions.max())
            if highest >= self.config.act_dim:
                raise ValueError(f"actions must be from 0 to {self.config.act_dim - 1} (negative: padding), got "
                                 f"{highest}")

    def check_state(self, state: MemoryState, batch: int | None = None) -> None:
        """ValueError, saying what was expected, for a state that is not this model's (another number of
        memory tokens, width, layers or cache) or not for a batch of `batch` rows (None: any, the same
        for memory and cache): read anyway, the logits would be taken at the wrong tokens."""
        c = self.config
        if not isinstance(state, MemoryState):
            raise ValueError(f"state must be a MemoryState (from initial_state() or the previous segment), got "
                             f"{type(state).__name__}")
        rows = set() if batch is None else {batch}
        if c.num_mem_tokens == 0:
            if state.memory is not None:
                raise ValueError("this model has no memory tokens (num_mem_tokens=0), but the state holds memory: "
                                 "it comes from another model")
        else:
            shape = None if state.memory is None else tuple(state.memory.shape)
            if shape is None or len(shape) != 3 or shape[1:] != (c.num_mem_tokens, c.d_model):
                raise ValueError(f"state.memory must be (B, num_mem_tokens, d_model) = (B, {c.num_mem_tokens}, "
                                 f"{c.d_model}) for this model, got {shape}: a state from another model?")
            rows.add(shape[0])
        if state.cache is not None:
            if c.mem_len == 0:
                raise ValueError("this model keeps no cache (mem_len=0), but the state holds one: it comes from "
                                 "another model")
            if len(state.cache) != c.n_layer:
                raise ValueError(f"state.cache must hold one tensor per layer ({c.n_layer}), got {len(state.cache)}")
            for layer in state.cache:
                shape = tuple(layer.shape)
                if len(shape) != 3 or shape[2] != c.d_model or shape[1] > c.mem_len:
                    raise ValueError(f"state.cache tensors must be (B, L, d_model) with L at most mem_len = "
                                     f"{c.mem_len} and d_model = {c.d_model}, got {shape}")
                rows.add(shape[0])
        if len(rows) > 1:
            raise ValueError(f"the state's batch does not match: {sorted(rows)} rows "
                             + (f"(the inputs have {batch})" if batch is not None else "between memory and cache"))

    def action_tokens(self, actions):
        """actions (...) long, negative = padding -> (..., d) action tokens (all the padding token
        when the config has action_inputs=False)."""
        if self.config.action_inputs:
            ids = torch.where(actions < 0, self.config.act_dim, actions).long()
        else:
            ids = torch.full_like(actions, self.config.act_dim, dtype=torch.long)
        return self.action_encoder(ids)

    # ----------------------------------------------------------------------------------- core
    def attention_mask(self, num_tokens: int, cache_len: int, device=None) -> torch.Tensor:
        """(m + S + m, L + m + S + m) bool mask (README, "The model") for S segment tokens and a
        cache of L positions: True where the query row may attend to the key column. Masks are
        built once per shape and shared (do not modify them). Safe for threads sharing the model (the
        app plays two episodes at once): the mask is returned from a local, as another thread may
        clear the shared dict between a look-up and a read."""
        key = (num_tokens, cache_len, str(torch.device(device or "cpu")))
        masks = self.__dict__.setdefault("_masks", {})
        mask = masks.get(key)
        if mask is None:
            mask = self._build_mask(num_tokens, cache_len, device)
            if len(masks) > 64:
                masks.clear()
            masks[key] = mask
        return mask

    def _build_mask(self, num_tokens: int, cache_len: int, device=None) -> torch.Tensor:
        m = self.config.num_mem_tokens
        q_len = 2 * m + num_tokens
        allowed = torch.zeros(q_len, cache_len + q_len, dtype=torch.bool, device=device)
        read, seg, write = slice(0, m), slice(m, m + num_tokens), slice(m + num_tokens, q_len)
        key = lambda s: slice(cache_len + s.start, cache_len + s.stop)  # noqa: E731
        allowed[read, key(read)] = True
        allowed[seg, :cache_len] = True
        allowed[seg, key(read)] = True
        allowed[seg, key(seg)] = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).tril()
        allowed[write, key(read)] = True
        allowed[write, key(seg)] = True
        allowed[write, key(write)] = True
        return allowed

    def run_core(self, tokens, read_memory=None, write_memory=None, cache=None):
        """tokens (B, S, d); read_memory, write_memory (B, m, d) or None; cache: per-layer
        (B, L, d) or None. Returns hidden (B, m + S + m, d) and the new cache (or None)."""
        parts = [p for p in (read_memory, tokens, write_memory) if p is not None]
        x = self.drop(torch.cat(parts, dim=1) if len(parts) > 1 else tokens)
        cache_len = 0 if cache is None else cache[0].shape[1]
        # Signed distances down to -(m - 1): the memory blocks are bidirectional.
        pos_emb = self.position_embedding(cache_len + x.shape[1], lowest=-max(self.config.num_mem_tokens - 1, 0))
        allowed = self.attention_mask(tokens.shape[1], cache_len, x.device)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        layer_inputs = []
        for i, layer in enumerate(self.layers):
            layer_inputs.append(x)
            past = None if cache is None else layer.key_values(cache[i])
            args = (x, past, pos_emb, self.content_bias, self.position_bias, allowed)
            # Recomputing a layer in backward keeps only its input alive: the activations of all
            # layers and segments would otherwise be held for the whole BPTT step.
            x = (checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args))[0]
        new_cache = None
        if self.config.mem_len > 0:
            with torch.no_grad():
                new_cache = tuple(
                    (h if cache is None else torch.cat([cache[i], h], dim=1))[:, -self.config.mem_len:].detach()
                    for i, h in enumerate(layer_inputs)
                )
        return self.drop(x), new_cache

    def position_embedding(self, key_len: int, lowest: int = 0) -> torch.Tensor:
        """(W, d) sinusoidal embeddings of the distances key_len - 1 down to `lowest`."""
        device = self.content_bias.device
        distances = torch.arange(key_len - 1, lowest - 1, -1, device=device)
        return self.drop(sinusoid(distances, self.config.d_model).to(self.content_bias.dtype))

    # ---------------------------------------------------------------- incremental inference
    @torch.no_grad()
    def begin_segment(self, state: MemoryState) -> SegmentContext:
        """Start incremental inference of a segment from `state`: per layer, the key and value rows
        of what every token of the segment sees before the segment's own tokens (the
        Transformer-XL cache and the read memory; read tokens see only each other, so their outputs
        do not depend on the segment), in buffers with room for the whole segment and the write
        tokens. Then call extend_segment for each step and finish_segment at the end."""
        self.check_state(state)
        c = self.config
        m = c.num_mem_tokens
        device = self.content_bias.device
        x = state.memory
        pos_emb = self.position_embedding(m, lowest=1 - m) if m else None  # read tokens see both ways
        read_mask = torch.ones(m, m, dtype=torch.bool, device=device)
        cache_len = 0 if state.cache is None else state.cache[0].shape[1]
        batch = x.shape[0] if x is not None else (None if state.cache is None else state.cache[0].shape[0])
        prefix_len = cache_len + m
        capacity = prefix_len + 3 * c.segment_steps + m
        # Every distance a segment can need: capacity - 1 down to -(m - 1) (write tokens see each other).
        top = capacity - 1
        full_pos_emb = self.position_embedding(capacity, lowest=-max(m - 1, 0))
        mask = self.attention_mask(3 * c.segment_steps, cache_len, device)
        inputs = [] if c.mem_len > 0 else None
        buffers, position_keys = [], []
        for i, layer in enumerate(self.layers):
            keys, values = [], []
            if state.cache is not None:
                key, value = layer.key_values(state.cache[i])
                keys.append(key)
                values.append(value)
            if inputs is not None:
                inputs.append([] if x is None else [x])
            if x is not None:
                x, (key, value), _ = layer(x, None, pos_emb, self.content_bias, self.position_bias, read_mask)
                keys.append(key)
                values.append(value)
            prefix = (torch.cat(keys, 1), torch.cat(values, 1)) if keys else None
            buffers.append(None if batch is None else
                           KeyValueBuffer(prefix, batch * c.n_head, capacity, c.d_head, self.content_bias))
            position_keys.append(layer.position_keys(full_pos_emb))
        return SegmentContext(state, buffers, position_keys, top, mask, prefix_len, cache_len, c.n_head, inputs)

    def _extend(self, x: torch.Tensor, context: SegmentContext, rows: slice, lowest: int, need_weights: bool):
        """Run new positions x (B, n, d) through every layer against the context's keys."""
        n = x.shape[1]
        if context.buffers[0] is None:  # no memory and no cache yet: the batch size is known now
            capacity = 3 * self.config.segment_steps
            context.buffers = [KeyValueBuffer(None, x.shape[0] * self.config.n_head, capacity, self.config.d_head, x)
                               for _ in self.layers]
        key_len = context.buffers[0].length + n
        allowed = context.mask[rows, :key_len]
        weights = []
        for i, (layer, buffer) in enumerate(zip(self.layers, context.buffers, strict=True)):
            if context.inputs is not None:
                context.inputs[i].append(x)
            x, _, w = layer(x, buffer, None, self.content_bias, self.position_bias, allowed,
                            position_key=context.position_key(i, key_len, lowest), need_weights=need_weights)
            weights.append(w)
        return x, (weights if need_weights else None)

    @torch.no_grad()
    def extend_segment(self, tokens: torch.Tensor, context: SegmentContext, need_weights: bool = False):
        """Process the next n trajectory tokens (B, n, d) of the segment of `context`, reusing every
        earlier key and value: the outputs equal a full pass over the segment so far.
        Returns hidden (B, n, d) and, with need_weights, per layer the attention probabilities
        (B, H, n, prefix_len + done + n) of the new tokens (else None)."""
        m, done, n = self.config.num_mem_tokens, context.done, tokens.shape[1]
        out = self._extend(tokens, context, slice(m + done, m + done + n), 0, need_weights)
        context.done = done + n
        return out

    @torch.no_grad()
    def finish_segment(self, context: SegmentContext) -> MemoryState:
        """After all 3K trajectory tokens of a full segment (its last action included) went through
        extend_segment: run the write tokens and return the next segment's memory and cache, equal
        to those of forward() over the whole segment."""
        m, done = self.config.num_mem_tokens, context.done
        if done != context.mask.shape[0] - 2 * m:
            raise ValueError(
                f"finish_segment needs a full segment of {context.mask.shape[0] - 2 * m} tokens, got {done}")
        memory, cache = context.state
        if m:
            write_out, _ = self._extend(memory, context, slice(m + done, 2 * m + done), -(m - 1), False)
            memory = self.update_memory(memory, write_out)
        new_cache = None
        if context.inputs is not None:
            new_cache = tuple(
                torch.cat(([] if cache is None else [cache[i]]) + layer_inputs, 1)[:, -self.config.mem_len:]
                for i, layer_inputs in enumerate(context.inputs)
            )
        return MemoryState(memory, new_cache)

    @torch.no_grad()
    def last_step_logits(self, rtg, obs, actions) -> torch.Tensor:
        """Logits (B, A) of the last step of a window of a model without memory or cache (DT),
        equal to forward()[0][:, -1]: the top layer computes only the o_t row that predicts it."""
        return self.last_step_logits_from_tokens(self.embed(rtg, obs, actions))

    @torch.no_grad()
    def last_step_logits_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """last_step_logits from already embedded tokens (B, 3T, d) (a rollout embeds each step once)."""
        return self.head(self.last_step_output_from_tokens(tokens))

    @torch.no_grad()
    def last_step_output_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The output (B, d) at the last step's observation token, which the heads read."""
        if self.config.num_mem_tokens or self.config.mem_len:
            raise ValueError("last_step_logits is for models without memory tokens or cache (dt)")
        n = tokens.shape[1]
        pos_emb = self.position_embedding(n)
        allowed = self.attention_mask(n, 0, tokens.device)
        x = tokens
        for layer in self.layers[:-1]:
            x = layer(x, None, pos_emb, self.content_bias, self.position_bias, allowed)[0]
        top, row = self.layers[-1], n - 2  # the last o_t; the pad action token after it is unseen
        x = top(x[:, row:row + 1], top.key_values(x[:, :row]), pos_emb[n - row - 1:], self.content_bias,
                self.position_bias, allowed[row:row + 1, :row + 1])[0]
        return x[:, 0]

    def update_memory(self, memory, write_out):
        """memory (B, m, d): this segment's memory; write_out (B, m, d): outputs at the write
        positions. Returns the next segment's memory (B, m, d) via the MRV, or write_out (RMT)."""
        if self.mrv is None:
            return write_out
        values = self.mrv_act(write_out)
        attended, _ = self.mrv(memory, values, values, need_weights=False)
        return self.mrv_proj(attended)

    def forward(self, rtg, obs, actions, state: MemoryState | None = None):
        """Process one segment of T steps (training and the rollout use T <= segment_steps; a longer T
        is read as one longer segment, which the model was not trained on).

        rtg: (B, T) or (B, T, 1); obs: (B, T, *obs_shape), uint8 images or float vectors; actions: (B, T) long with
        negative values for padding. state: from initial_state() or the previous segment.
        Returns logits (B, T, act_dim) (row t predicts a_t from R_<=t, o_<=t, a_<t) and the state
        for the next segment.
        """
        logits, _, state = self.segment(rtg, obs, actions, state)
        return logits, state

    def segment(self, rtg, obs, actions, state: MemoryState | None = None):
        """forward() with the auxiliary head's logits too: (logits (B, T, act_dim), auxiliary logits
        (B, T, aux_classes) from the same step outputs, or None without an auxiliary head, state)."""
        batch, steps = actions.shape
        if state is None:
            state = self.initial_state(batch)
        self.check_state(state, batch)
        hidden, state = self.advance(self.embed(rtg, obs, actions), state)
        m = self.config.num_mem_tokens
        outputs = hidden[:, m + 1 : m + 3 * steps : 3]
        aux = self.aux_head(outputs) if self.aux_head is not None else None
        return self.head(outputs), aux, state

    def advance(self, tokens: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, MemoryState]:
        """One segment of embedded tokens (B, S, d) from `state`: hidden (B, m + S + m, d) and the
        next segment's state (memory through the MRV, Transformer-XL cache)."""
        m = self.config.num_mem_tokens
        hidden, cache = self.run_core(tokens, state.memory, state.memory, state.cache)
        memory = self.update_memory(state.memory, hidden[:, m + tokens.shape[1]:]) if m else None
        return hidden, MemoryState(memory, cache)

    @torch.no_grad()
    def replay(self, segments: list[torch.Tensor], batch_size: int) -> MemoryState:
        """The state after these whole segments of embedded tokens (each (B, 3K, d)), from the
        initial state: what the model would carry had the episode started with the first of them."""
        state = self.initial_state(batch_size)
        for tokens in segments:
            state = self.advance(tokens, state)[1]
        return state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------- hub integration
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, map_location="cpu", revision=None, **download):
        """A local checkpoint folder, or a Hub repository USER/NAME (found in or fetched into the local Hub
        cache), through load_checkpoint: its checks and CheckpointError naming the file, where the mixin
        would read config.json unchecked; safetensors only, never pickle. download: force_download,
        token, cache_dir, local_files_only, as in PyTorchModelHubMixin.from_pretrained."""
        from rate_core.checkpoint import load_checkpoint
        from rate_core.hub import pretrained_folder

        return load_checkpoint(pretrained_folder(pretrained_model_name_or_path, revision, **download),
                               device=map_location)
