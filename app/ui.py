"""The demo page. Until the playback issue lands it lists the shipped checkpoints and lets a visitor
inspect the model configurations of the paper's four tasks."""

from pathlib import Path

import gradio as gr

from rate_core.checkpoint import CheckpointError, read_checkpoint_config
from rate_core.model import MemoryTransformer
from rate_core.paper import PAPER_PARAMETER_COUNTS, PAPER_TASKS, paper_config

CHECKPOINT_ROOT = Path(__file__).resolve().parent.parent / "assets" / "checkpoints"

INTRO = """# RATE: Recurrent Action Transformer with Memory
A transformer for offline reinforcement learning that reads a trajectory in segments and carries
what matters from one segment to the next in a few **memory tokens**. RATE, RMT, Transformer-XL and
the Decision Transformer are configurations of the same model here.

The side-by-side playback (a RATE agent next to a Decision Transformer on the same episode) comes
with the trained checkpoints. Below: what is shipped, and what each task's model looks like."""


def shipped_checkpoints(root: Path = CHECKPOINT_ROOT) -> list[list[str]]:
    """Rows of (task, mode, folder, status) for every checkpoint folder under root."""
    rows = []
    for config_path in sorted(root.glob("*/*/config.json")):
        folder = config_path.parent
        try:
            config = read_checkpoint_config(folder)
            rows.append([config.get("task", "?"), config["model_config"].mode, str(folder.relative_to(root)), "ok"])
        except CheckpointError as error:
            rows.append(["?", "?", str(folder.relative_to(root)), f"unusable: {error}"])
    return rows


def describe(task: str, mode: str) -> tuple[str, dict]:
    """A one-paragraph description and the config of the paper's model for task in mode."""
    config = paper_config(task, mode)
    count = MemoryTransformer(config).num_parameters()
    paper = PAPER_PARAMETER_COUNTS.get((task, mode))
    paper_text = f" (the paper reports {paper:,})" if paper else ""
    text = (f"**{task} / {mode}**: {config.n_layer} layers of width {config.d_model}, "
            f"{config.num_mem_tokens} memory tokens, a Transformer-XL cache of {config.mem_len} tokens, "
            f"segments of {config.segment_steps} steps: {count:,} parameters{paper_text}.")
    return text, vars(config)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="RATE: memory transformers for offline RL") as demo:
        gr.Markdown(INTRO)
        rows = shipped_checkpoints()
        gr.Markdown("## Shipped checkpoints")
        if rows:
            gr.Dataframe(value=rows, headers=["task", "mode", "folder", "status"], interactive=False)
        else:
            gr.Markdown("No trained checkpoints are shipped yet (they land under `assets/checkpoints/`).")
        gr.Markdown("## The model of each task (paper configuration)")
        with gr.Row():
            task = gr.Dropdown(list(PAPER_TASKS), value=PAPER_TASKS[0], label="task")
            mode = gr.Radio(["rate", "rmt", "trxl", "dt"], value="rate", label="mode")
        summary = gr.Markdown()
        config_view = gr.JSON(label="model config")
        for trigger in (demo.load, task.change, mode.change):
            trigger(describe, [task, mode], [summary, config_view], api_name=False)
    return demo
