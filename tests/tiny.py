"""Tiny model configurations shared by the tests: fast on CPU, every mode and observation kind."""

import torch

from rate_core.model import MemoryTransformer, ModelConfig

K, N = 4, 3  # steps per segment, segments per sample

MODE_FIELDS = {
    "rate": dict(num_mem_tokens=3, mem_len=0, n_head_ca=2),
    "rate_cached": dict(num_mem_tokens=3, mem_len=12, n_head_ca=2),
    "rmt": dict(num_mem_tokens=3, mem_len=0, n_head_ca=0),
    "trxl": dict(num_mem_tokens=0, mem_len=2 * (3 * K), n_head_ca=0),
    "dt": dict(num_mem_tokens=0, mem_len=0, n_head_ca=0),
}


def tiny_config(variant: str = "rate", **overrides) -> ModelConfig:
    fields = dict(
        mode=variant.split("_")[0], obs_kind="vector", obs_shape=(4,), act_dim=4, context_length=K, sections=N,
        d_model=16, n_layer=2, n_head=2, d_head=8, use_ffn=True, d_inner=32, dropout=0.1, dropatt=0.1,
        conv_channels=(4, 8, 8),
    )
    fields.update(MODE_FIELDS[variant])
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(variant: str = "rate", seed: int = 0, **overrides) -> MemoryTransformer:
    torch.manual_seed(seed)
    return MemoryTransformer(tiny_config(variant, **overrides), task="unit_test").eval()


def random_batch(config: ModelConfig, batch: int = 2, steps: int | None = None, seed: int = 1):
    """(rtg (B, T), obs (B, T, *obs_shape), actions (B, T)) for a K*N-step sample."""
    steps = steps or config.context_length * config.sections
    gen = torch.Generator().manual_seed(seed)
    rtg = torch.rand(batch, steps, generator=gen)
    if config.obs_kind == "vector":
        obs = torch.randn(batch, steps, *config.obs_shape, generator=gen)
    else:
        obs = torch.randint(0, 256, (batch, steps, *config.obs_shape), generator=gen, dtype=torch.uint8)
    actions = torch.randint(0, config.act_dim, (batch, steps), generator=gen)
    return rtg, obs, actions


def sample_logits(model: MemoryTransformer, rtg, obs, actions) -> torch.Tensor:
    """Logits (B, T, A) of a whole sample processed segment by segment, as in training."""
    from training.step import segment_slices

    state, out = None, []
    for seg in segment_slices(model, actions.shape[1]):
        logits, state = model(rtg[:, seg], obs[:, seg], actions[:, seg], state)
        out.append(logits)
    return torch.cat(out, dim=1)


ALL_VARIANTS = list(MODE_FIELDS)



def weights_differ(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of two models of the same architecture differs."""
    return any(not torch.equal(a, b)
               for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
