"""The memory panel: what the memory tokens hold, how they change, how much each step reads them,
and both agents' action probabilities. Each function returns a matplotlib figure and a one-line
caption."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rate_core.rollout import EpisodeTrace  # noqa: E402

MAX_HEATMAPS = 8


def _empty(title: str, message: str):
    figure, axis = plt.subplots(figsize=(8, 2.2))
    axis.set_axis_off()
    axis.set_title(title)
    axis.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="0.4", transform=axis.transAxes)
    figure.tight_layout()
    return figure


def _segment_lines(axis, trace: EpisodeTrace):
    """Dotted lines where the trace's segments begin (none for DT, which slides its window step by step)."""
    if trace.sliding_window:
        return
    for step in range(trace.segment_steps, trace.length, trace.segment_steps):
        axis.axvline(step, color="0.6", linestyle=":", linewidth=1)


def memory_heatmaps(trace: EpisodeTrace | None, name: str):
    """The memory tokens (tokens x features) at the start and after each update, up to 8 of them spread
    over the episode; the title and caption say which are shown and which one no segment reads."""
    if trace is None or trace.memory is None:
        return _empty(f"{name}: memory tokens", "this model has no memory tokens"), ""
    count = len(trace.memory)  # the learned initial memory, then one per update
    shown = np.unique(np.linspace(0, count - 1, min(count, MAX_HEATMAPS)).round().astype(int))
    updates = count - 1
    if updates == 0:
        title = f"{name}: memory tokens at the start (no update in this episode)"
    elif updates == 1:
        title = f"{name}: memory tokens at the start and after its one update"
    elif len(shown) == count:
        title = f"{name}: memory tokens at the start and after each of its {updates} updates"
    else:
        title = f"{name}: memory tokens at the start and after {len(shown) - 1} of its {updates} updates"
    # an update at the end of a full last segment writes a memory that no segment reads
    final_unread = updates > 0 and trace.memory_update_steps[-1] + 1 >= trace.length
    # the scale of the memories the episode wrote: the learned initial memory is often much larger and
    # would leave every later panel pale; it is clipped to this scale instead (the caption says so)
    written = trace.memory[1:] if count > 1 else trace.memory
    limit = float(np.abs(written).max()) or 1.0
    start = float(np.abs(trace.memory[0]).max())
    clipped = count > 1 and start > limit
    # wide enough for the title whatever the number of panels
    figure, axes = plt.subplots(1, len(shown), figsize=(min(16, max(8, 2.2 * len(shown) + 1.5)), 3.0), squeeze=False,
                                layout="constrained")
    for axis, index in zip(axes[0], shown, strict=True):
        image = axis.imshow(trace.memory[index], aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                            interpolation="nearest")
        when = "start" if index == 0 else f"after step {trace.memory_update_steps[index - 1] + 1}"
        axis.set_title(when + (" (final)" if final_unread and index == count - 1 else ""), fontsize=9)
        axis.set_xlabel("feature", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0][0].set_ylabel("memory token", fontsize=8)
    figure.colorbar(image, ax=axes[0].tolist(), fraction=0.02, pad=0.01, extend="both" if clipped else "neither")
    figure.suptitle(title, fontsize=11)
    caption = (f"Each panel is the {trace.memory.shape[1]} x {trace.memory.shape[2]} memory: rows are memory tokens, "
               f"columns their features (red positive, blue negative). \"start\" is the learned initial memory, "
               f"which the first segment reads; the update at the end of each segment writes the memory the next "
               f"segment reads.")
    if final_unread:
        caption += " The final one is written after the last step played: no segment reads it."
    if len(shown) < count:
        caption += f" {len(shown)} of the {count} memories are shown, spread over the episode."
    if clipped:
        caption += (f" The colours span the memories written during the episode (up to {limit:.2g}); the learned "
                    f"initial memory reaches {start:.2g} and is clipped to that.")
    return figure, caption


def memory_change(trace: EpisodeTrace | None, name: str):
    """Relative change and cosine similarity of the memory at each update."""
    title = f"{name}: how much the memory changed at each update"
    if trace is None or trace.memory is None or len(trace.memory) < 2:
        message = "no memory update in this episode" if trace is not None and trace.memory is not None \
            else "this model has no memory tokens"
        return _empty(title, message), ""
    before, after = trace.memory[:-1], trace.memory[1:]
    flat_before, flat_after = before.reshape(len(before), -1), after.reshape(len(after), -1)
    change = np.linalg.norm(flat_after - flat_before, axis=1) / np.maximum(np.linalg.norm(flat_before, axis=1), 1e-9)
    cosine = (flat_after * flat_before).sum(1) / np.maximum(
        np.linalg.norm(flat_after, axis=1) * np.linalg.norm(flat_before, axis=1), 1e-9)
    steps = np.array(trace.memory_update_steps) + 1
    figure, axis = plt.subplots(figsize=(8, 3.2), layout="constrained")
    axis.plot(steps, change, "o-", color="tab:orange", label="relative change |M_new - M_old| / |M_old|")
    axis.set_xlabel("step of the update")
    axis.set_ylabel("relative change", color="tab:orange")
    twin = axis.twinx()
    twin.plot(steps, cosine, "s--", color="tab:blue", label="cosine similarity to the previous memory")
    twin.set_ylabel("cosine similarity", color="tab:blue")
    twin.set_ylim(min(-0.05, cosine.min() - 0.05), 1.05)
    axis.set_ylim(0, max(1e-9, change.max()) * 1.1)  # from 0, as the twin axis: not a drop where there is none
    axis.set_title(title, fontsize=11)
    lines = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # under the axes, where it hides no point
    figure.legend(lines, [line.get_label() for line in lines], fontsize=8, ncol=2, loc="outside lower center")
    caption = ("At every segment boundary the Memory Retention Valve writes new memory; a large change with low "
               "similarity means the segment rewrote what was stored, a small one that it kept it.")
    return figure, caption


def memory_attention(trace: EpisodeTrace | None, name: str, class_names: tuple[str, ...] = (), told: str = "",
                     truth: np.ndarray | None = None):
    """Share of each step's attention on the read memory tokens, per layer; below it, for a model
    trained with an auxiliary head, what that head reads at each step (`class_names`: its classes;
    `told`: what the episode actually had, e.g. 'pillar: red'; `truth`: (T,) the true class at each
    step, -1 where unknown, drawn over the reading when there are more than 3 classes, which are
    shown as a heatmap rather than lines)."""
    title = f"{name}: attention each step puts on the memory tokens"
    if trace is None or trace.memory_attention is None:
        return _empty(title, "this model has no memory tokens"), ""
    reads = trace.aux_probs is not None
    figure, axes = plt.subplots(2 if reads else 1, 1, figsize=(8, 4.8 if reads else 2.8), squeeze=False,
                                sharex=True)
    axis = axes[0, 0]
    steps = np.arange(trace.length)
    for layer in range(trace.memory_attention.shape[1]):
        axis.plot(steps, trace.memory_attention[:, layer], linewidth=1.2, label=f"layer {layer + 1}")
    _segment_lines(axis, trace)
    axis.set_ylabel("share of attention")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=11)
    axis.legend(fontsize=8, ncol=4, loc="upper right")
    caption = ("For the observation token that chooses each action: the fraction of its attention (averaged over "
               "heads) that goes to the memory tokens rather than the current segment's own tokens.")
    if reads:
        axis = axes[1, 0]
        classes = trace.aux_probs.shape[1]
        labels = [class_names[c] if c < len(class_names) else f"class {c}" for c in range(classes)]
        if classes <= 3:
            for c in range(classes):  # a class named by a colour (ViZDoom's pillar) is drawn in it
                colour = {"green": "tab:green", "red": "tab:red"}.get(labels[c], f"C{c}")
                axis.plot(steps, trace.aux_probs[:, c], linewidth=1.6, label=labels[c], color=colour)
            axis.set_ylim(-0.04, 1.04)  # a curve at 0 or 1 stays visible
            axis.set_ylabel("probability")
            axis.legend(fontsize=8, ncol=4, loc="center right")
            caption += (" Below: the model was trained to say, at every step, what it must remember; the curve is "
                        "what it says. Steady after the cue is gone means the memory holds it.")
        else:
            axis.imshow(trace.aux_probs.T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1,
                        interpolation="nearest", extent=(-0.5, trace.length - 0.5, -0.5, classes - 0.5))
            axis.set_yticks(range(classes), labels, fontsize=7)
            if truth is not None:
                known = truth >= 0
                axis.scatter(steps[known], truth[known], s=4, color="cyan", label="true")
                axis.legend(fontsize=8, loc="upper right")
            caption += (" Below: the model was trained to say, at every step, what it must remember; bright is what "
                        "it says (its probability per class)" + (", cyan dots the truth" if truth is not None else "")
                        + ". Right when the answer is out of view means the memory holds it.")
        _segment_lines(axis, trace)
        title = f"{name}: what its auxiliary head reads from memory and view"
        if told:
            title += ("\n" if len(title) + len(told) > 70 else " ") + f"(the episode's {told})"
        axis.set_title(title, fontsize=11 if "\n" not in title else 9)
    axes[-1, 0].set_xlabel("step (dotted: segment boundaries)")
    figure.tight_layout()
    return figure, caption


def action_probabilities(traces: list[EpisodeTrace], names: list[str], action_names: tuple[str, ...]):
    """Both agents' action probabilities over the episode (stacked areas) and over its last steps."""
    figure, axes = plt.subplots(len(traces), 2, figsize=(9, 1.9 * len(traces) + 0.8), squeeze=False,
                                gridspec_kw={"width_ratios": [3, 1]}, layout="constrained")
    longest = max(t.length for t in traces)
    for row, (trace, name) in enumerate(zip(traces, names, strict=True)):
        labels = [action_names[a] if a < len(action_names) else str(a) for a in range(trace.probs.shape[1])]
        colours = [f"C{a}" for a in range(len(labels))]
        axis = axes[row, 0]
        axis.stackplot(np.arange(trace.length), trace.probs.T, labels=labels, colors=colours, alpha=0.85)
        _segment_lines(axis, trace)
        axis.set_ylim(0, 1)
        axis.set_xlim(0, max(1, longest - 1))
        axis.set_ylabel("probability", fontsize=9)
        axis.set_title(f"{name}: whole episode", fontsize=10, loc="left")
        last = axes[row, 1]
        tail = np.arange(max(0, trace.length - 8), trace.length)
        bottom = np.zeros(len(tail))
        for a, (label, colour) in enumerate(zip(labels, colours, strict=True)):
            last.bar(tail, trace.probs[tail, a], bottom=bottom, color=colour, alpha=0.85, width=0.8)
            bottom += trace.probs[tail, a]
        last.set_ylim(0, 1)
        last.set_title("last steps", fontsize=10, loc="left")
        last.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("step (dotted: segment boundaries)")
    axes[-1, 1].set_xlabel("step")
    figure.suptitle("Action probabilities of both agents over time", fontsize=11)
    figure.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=8, ncol=len(labels), loc="outside lower center")
    caption = ("How sure each agent is of each action at every step; the right-hand panels zoom into the last "
               "steps, where a memory task is decided.")
    return figure, caption


def what_if(results: list[dict], names: list[str], action_names: tuple[str, ...], label: str):
    """Last-step action probabilities of each agent as played and with the counterfactual (the app hides
    this panel where the task has none)."""
    title = f"What if the {label} had been the other way? The last decision of each agent"
    figure, axes = plt.subplots(1, len(results), figsize=(9, 2.8), squeeze=False, sharey=True, layout="constrained")
    labels = [action_names[a] if a < len(action_names) else str(a) for a in range(len(results[0]["played"]))]
    positions = np.arange(len(labels))
    for axis, result, name in zip(axes[0], results, names, strict=True):
        axis.bar(positions - 0.2, result["played"], width=0.4, label="as played", color="tab:blue")
        axis.bar(positions + 0.2, result["flipped"], width=0.4, label=f"with the other {label}", color="tab:orange")
        axis.set_xticks(positions, labels)
        axis.set_ylim(0, 1)
        axis.set_title(name, fontsize=10, loc="left")
    axes[0, 0].set_ylabel("probability of the action")
    figure.legend(*axes[0, -1].get_legend_handles_labels(), fontsize=8, ncol=2, loc="outside lower center")
    figure.suptitle(title, fontsize=11)
    caption = (f"The same episode replayed with only the {label} changed (same steps and actions otherwise). An agent "
               f"that remembers the {label} changes its final choice; one that has forgotten it cannot.")
    return figure, caption


def close(figures) -> None:
    for figure in figures:
        plt.close(figure)
