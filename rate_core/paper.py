"""The paper's model configurations and parameter counts (the paper's hyperparameter tables), as reference points.

`paper_config(task, mode)` gives the published architecture of a task in any of the four modes;
`PAPER_PARAMETER_COUNTS` holds the counts the paper reports for RATE and DT (its Table 12).
"""

from rate_core.model import ModelConfig
from rate_core.tasks import mode_variants

_PAPER_RATE = {
    "tmaze": ModelConfig(
        mode="rate", obs_kind="vector", obs_shape=(4,), act_dim=4, context_length=50, sections=3,
        d_model=64, n_layer=8, n_head=8, use_ffn=False, num_mem_tokens=10, mem_len=0, n_head_ca=2,
        dropout=0.2, dropatt=0.1,
    ),
    "vizdoom_two_colors": ModelConfig(
        mode="rate", obs_kind="image", obs_shape=(3, 64, 112), act_dim=5, context_length=50, sections=3,
        d_model=64, n_layer=6, n_head=8, use_ffn=True, num_mem_tokens=15, mem_len=100, n_head_ca=2,
        dropout=0.2, dropatt=0.05,
    ),
    "minigrid_memory": ModelConfig(
        mode="rate", obs_kind="image", obs_shape=(3, 84, 84), act_dim=3, context_length=30, sections=3,
        d_model=128, n_layer=4, n_head=4, use_ffn=True, num_mem_tokens=10, mem_len=180, n_head_ca=4,
        dropout=0.3, dropatt=0.1,
    ),
    "memory_maze": ModelConfig(
        mode="rate", obs_kind="image", obs_shape=(3, 64, 64), act_dim=6, context_length=30, sections=3,
        d_model=64, n_layer=6, n_head=8, use_ffn=False, num_mem_tokens=15, mem_len=360, n_head_ca=2,
        dropout=0.5, dropatt=0.2,
    ),
}

PAPER_PARAMETER_COUNTS = {
    ("tmaze", "rate"): 1_723_840, ("tmaze", "dt"): 1_775_488,
    ("vizdoom_two_colors", "rate"): 4_537_504, ("vizdoom_two_colors", "dt"): 4_672_032,
    ("minigrid_memory", "rate"): 2_000_864, ("minigrid_memory", "dt"): 2_051_872,
    ("memory_maze", "rate"): 1_639_840, ("memory_maze", "dt"): 1_673_696,
}

PAPER_TASKS = tuple(_PAPER_RATE)


def paper_config(task: str, mode: str = "rate") -> ModelConfig:
    """The paper's architecture for `task` as a `mode` model (rate | rmt | trxl | dt)."""
    if task not in _PAPER_RATE:
        raise KeyError(f"no paper config for task {task!r}; known: {', '.join(PAPER_TASKS)}")
    rate = _PAPER_RATE[task]
    # TrXL keeps the paper's own cache length where it gives one (Minigrid and ViZDoom: shorter than a sample,
    # Memory Maze: longer); where it gives none (T-Maze), a cache that covers the sample: N segments of 3K tokens.
    variants = mode_variants(rate, cache_len=rate.mem_len or 3 * rate.context_length * rate.sections)
    if mode not in variants:
        raise ValueError(f"mode={mode!r}, expected rate | rmt | trxl | dt")
    return variants[mode]
