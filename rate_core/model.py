"""The memory transformer: one module for RATE, RMT, TrXL and DT (see shared spec model.md).

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
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch.utils.checkpoint import checkpoint

from rate_core.attention import relative_attention, sinusoid

MODES = ("rate", "rmt", "trxl", "dt")
OBS_KINDS = ("vector", "image")
MRV_ACTIVATIONS = ("relu", "leaky_relu", "tanh", "none")
ACTION_PAD = -10  # action value that marks padding in datasets and the unknown current action


@dataclass
class ModelConfig:
    """Architecture of a MemoryTransformer. Defaults: the paper's T-Maze RATE (model.md section 7)."""

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

    def __post_init__(self):
        # JSON gives lists; keep tuples so configs compare equal after a round trip.
        self.obs_shape = tuple(int(s) for s in self.obs_shape)
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        self.validate()

    def validate(self):
        """Raise ValueError naming the field when the configuration is inconsistent."""

        def check(ok, message):
            if not ok:
                raise ValueError(f"invalid ModelConfig: {message}")

        check(self.mode in MODES, f"mode={self.mode!r}, expected one of {MODES}")
        check(self.obs_kind in OBS_KINDS, f"obs_kind={self.obs_kind!r}, expected one of {OBS_KINDS}")
        check(self.mrv_act in MRV_ACTIVATIONS, f"mrv_act={self.mrv_act!r}, expected one of {MRV_ACTIVATIONS}")
        if self.obs_kind == "vector":
            check(len(self.obs_shape) == 1, f"vector observations need obs_shape=(D,), got {self.obs_shape}")
        else:
            check(len(self.obs_shape) == 3 and self.obs_shape[0] == 3,
                  f"image observations need obs_shape=(3, H, W), got {self.obs_shape}")
        for name in ("act_dim", "context_length", "sections", "d_model", "n_layer", "n_head", "d_head"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_mem_tokens", "mem_len", "n_head_ca"):
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

    def forward(self, x, past, pos_emb, content_bias, position_bias, allowed):
        """x: (B, Q, d) inputs at the newest Q positions; past: key and value rows (B * H, P, dh) of
        the P positions before them (XL cache, read memory, earlier tokens), a KeyValueBuffer holding
        them (the new rows are appended in place), or None; pos_emb:
        (W, d) embeddings of the distances P + Q - 1 down to P + Q - W; content_bias, position_bias:
        (H, d_head); allowed: (Q, P + Q) bool, True where query i may attend to key j.
        Returns the output (B, Q, d) and the key and value rows (B * H, Q, dh) of the new positions."""
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
        attended = relative_attention(
            self.rows(query), keys, values, content_bias, position_bias,
            self.pos_proj(pos_emb).view(-1, self.n_head, self.d_head).transpose(0, 1), allowed,
            scale=1.0 / math.sqrt(self.d_head), dropout=self.dropatt if self.training else 0.0,
        )
        attended = attended.view(batch, self.n_head, q_len, self.d_head).transpose(1, 2).reshape(batch, q_len, -1)

        x = self.attn_norm(x + self.drop(self.out(attended)))
        if self.ffn is not None:
            x = self.ffn_norm(x + self.ffn(x))
        return x, (key, value)


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
        return self.proj(self.convs(images.float() / 255.0))


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
        batch, steps = actions.shape
        rtg = rtg.reshape(batch, steps, 1).float()
        obs = obs.reshape(batch * steps, *self.config.obs_shape)
        obs_tokens = self.obs_encoder(obs.float() if self.config.obs_kind == "vector" else obs)
        action_ids = torch.where(actions < 0, self.config.act_dim, actions).long()
        tokens = torch.stack([
            self.rtg_encoder(rtg),
            obs_tokens.view(batch, steps, -1),
            self.action_encoder(action_ids),
        ], dim=2)
        return tokens.view(batch, 3 * steps, self.config.d_model)

    # ----------------------------------------------------------------------------------- core
    def attention_mask(self, num_tokens: int, cache_len: int, device=None) -> torch.Tensor:
        """(m + S + m, L + m + S + m) bool mask of model.md section 2 for S segment tokens and a
        cache of L positions: True where the query row may attend to the key column."""
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
            x, _ = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
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
    def begin_segment(self, state: MemoryState) -> list:
        """Per layer, the key and value rows (B * H, L + m, dh) of what every token of a segment
        sees before the segment's own tokens: the Transformer-XL cache and the read memory.
        (Read tokens see only each other, so their layer outputs do not depend on the segment.)"""
        m = self.config.num_mem_tokens
        x = state.memory
        pos_emb = self.position_embedding(m, lowest=1 - m) if m else None  # read tokens see both ways
        read_mask = torch.ones(m, m, dtype=torch.bool, device=self.content_bias.device)
        prefixes = []
        for i, layer in enumerate(self.layers):
            keys, values = [], []
            if state.cache is not None:
                key, value = layer.key_values(state.cache[i])
                keys.append(key)
                values.append(value)
            if x is not None:
                x, (key, value) = layer(x, None, pos_emb, self.content_bias, self.position_bias, read_mask)
                keys.append(key)
                values.append(value)
            prefixes.append((torch.cat(keys, 1), torch.cat(values, 1)) if keys else None)
        return prefixes

    @torch.no_grad()
    def extend_segment(self, tokens: torch.Tensor, prefixes: list, segment_kv: list | None, done: int):
        """Process the next `n` trajectory tokens (B, n, d) of a segment whose first `done` tokens
        were processed before (segment_kv: what this returned then; None when done = 0), reusing
        every earlier key and value: the outputs equal a full pass over the segment so far.
        Returns hidden (B, n, d) and segment_kv (per-layer KeyValueBuffers) for the next call."""
        n = tokens.shape[1]
        m = self.config.num_mem_tokens
        prefix_len = 0 if prefixes[0] is None else prefixes[0][0].shape[1]
        cache_len = prefix_len - m
        if segment_kv is None:
            capacity = prefix_len + 3 * self.config.segment_steps
            rows = tokens.shape[0] * self.config.n_head
            segment_kv = [KeyValueBuffer(prefix, rows, capacity, self.config.d_head, tokens) for prefix in prefixes]
        rows = slice(m + done, m + done + n)
        allowed = self.attention_mask(done + n, cache_len, tokens.device)[rows, : cache_len + m + done + n]
        pos_emb = self.position_embedding(prefix_len + done + n)
        x = tokens
        for layer, buffer in zip(self.layers, segment_kv):
            x, _ = layer(x, buffer, pos_emb, self.content_bias, self.position_bias, allowed)
        return x, segment_kv

    def update_memory(self, memory, write_out):
        """memory (B, m, d): this segment's memory; write_out (B, m, d): outputs at the write
        positions. Returns the next segment's memory (B, m, d) via the MRV, or write_out (RMT)."""
        if self.mrv is None:
            return write_out
        values = self.mrv_act(write_out)
        attended, _ = self.mrv(memory, values, values, need_weights=False)
        return self.mrv_proj(attended)

    def forward(self, rtg, obs, actions, state: MemoryState | None = None):
        """Process one segment of T steps (T <= segment_steps).

        rtg: (B, T) or (B, T, 1); obs: (B, T, *obs_shape) float or uint8; actions: (B, T) long with
        negative values for padding. state: from initial_state() or the previous segment.
        Returns logits (B, T, act_dim) (row t predicts a_t from R_<=t, o_<=t, a_<t) and the state
        for the next segment.
        """
        batch, steps = actions.shape
        if state is None:
            state = self.initial_state(batch)
        tokens = self.embed(rtg, obs, actions)
        m = self.config.num_mem_tokens
        hidden, cache = self.run_core(tokens, state.memory, state.memory, state.cache)
        logits = self.head(hidden[:, m + 1 : m + 3 * steps : 3])
        memory = None
        if m:
            memory = self.update_memory(state.memory, hidden[:, m + 3 * steps :])
        return logits, MemoryState(memory, cache)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------- hub integration
    @classmethod
    def _from_pretrained(cls, *, model_id, map_location="cpu", **kwargs):
        """from_pretrained() of a local folder goes through the validating checkpoint loader."""
        from rate_core.checkpoint import load_checkpoint

        return load_checkpoint(model_id, device=map_location)
