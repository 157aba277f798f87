"""Checkpoints on the Hugging Face Hub: `hf://USER/NAME` references, and the model card that says
what a checkpoint scores (the Hub's model-index metadata, from the evaluator's eval.json).

Nothing here needs the network unless a hf:// reference is not in the local Hub cache; then the
error says what to do (go online, or set HF_HUB_OFFLINE=1 only once the files are cached).
"""

import json
import os
from pathlib import Path

import torch

from rate_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_checkpoint
from rate_core.model import MemoryTransformer
from rate_core.tasks import TASKS, result_key

HF_PREFIX = "hf://"
# what a hf:// reference downloads: the model and its scores; not the card or the video (a repository named by
# anyone, e.g. a visitor of the demo, may hold large files the loader never reads), and only at the top level
DOWNLOAD_FILES = [CONFIG_NAME, WEIGHTS_NAME, "eval.json"]
DOWNLOAD_ARGS = ("force_download", "token", "cache_dir", "local_files_only")  # from_pretrained's, as the mixin's


def is_hub_reference(ref) -> bool:
    return str(ref).startswith(HF_PREFIX)


def is_repo_id(name: str) -> bool:
    """Whether `name` can be a Hub model repository USER/NAME."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def checkpoint_folder(ref: str | os.PathLike, **download) -> Path:
    """The local folder of a checkpoint reference: a path, or `hf://USER/NAME[@REVISION]`, which is
    fetched into (or found in) the local Hub cache. download: more arguments of snapshot_download
    (cache_dir, token, force_download, local_files_only)."""
    if not is_hub_reference(ref):
        return Path(ref)
    repo_id, _, revision = str(ref)[len(HF_PREFIX):].partition("@")
    if not is_repo_id(repo_id):
        raise CheckpointError(f"{ref}: expected hf://USER/NAME (optionally @REVISION)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=DOWNLOAD_FILES, **download))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{ref}: not in the local Hugging Face cache and the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1); "
            f"connect to download it once, or give a local checkpoint folder instead") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{ref}: no such model repository on the Hub (or it is private: log in with "
                              f"`huggingface-cli login`)") from None
    except (HfHubHTTPError, OSError) as error:
        raise CheckpointError(f"{ref}: download failed ({error})") from None


def pretrained_folder(name: str | os.PathLike, revision: str | None = None, **download) -> Path:
    """The checkpoint folder of `MemoryTransformer.from_pretrained(name)`: `name` itself where it exists or
    cannot be a repository id, else the Hub repository USER/NAME (see checkpoint_folder); `hf://USER/NAME`
    works too. TypeError for a keyword that is not one of DOWNLOAD_ARGS (it would be dropped unseen)."""
    unknown = sorted(set(download) - set(DOWNLOAD_ARGS))
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}; it takes map_location, "
                        f"revision and {', '.join(DOWNLOAD_ARGS)} (to check the task or mode: "
                        f"rate_core.checkpoint.load_checkpoint(folder, task=..., mode=...))")
    name = str(name)
    if is_hub_reference(name):
        if revision and "@" in name:
            raise ValueError(f"{name} names a revision already; give it once (hf://USER/NAME@REVISION or revision=)")
        return checkpoint_folder(name + (f"@{revision}" if revision else ""), **download)
    if os.path.exists(name) or not is_repo_id(name):
        return Path(name)
    ref = f"{HF_PREFIX}{name}" + (f"@{revision}" if revision else "")
    try:
        return checkpoint_folder(ref, **download)
    except CheckpointError as error:  # a mistyped local path looks like USER/NAME too: say both
        raise CheckpointError(f"{name}: no such checkpoint folder here, and "
                              f"{str(error).removeprefix(f'{ref}: ')}") from None


def load_reference(ref: str | os.PathLike, task: str | None = None, mode: str | None = None,
                   device: str | torch.device = "cpu") -> MemoryTransformer:
    """A checkpoint to run on its task, from a local folder or `hf://USER/NAME[@REVISION]`, through
    load_checkpoint (the checks of MemoryTransformer.from_pretrained); CheckpointError naming config.json
    also when it names no registered task."""
    folder = checkpoint_folder(ref)  # download (or find in the cache), with a clear error when it cannot
    model = load_checkpoint(folder, task=task, mode=mode, device=device)
    if model.task not in TASKS:
        problem = f"unknown task {model.task!r}" if model.task else "names no task"
        raise CheckpointError(f"{folder / CONFIG_NAME}: {problem}; known tasks: {', '.join(sorted(TASKS))}")
    return model


def hub_model_card(model: MemoryTransformer, repo_id: str, evaluation: dict | None = None,
                   video: str | None = None, title: str | None = None) -> str:
    """A model card for the Hub: YAML metadata (library, tags, model-index with the evaluation
    table) and a body that says what the model is, how it was trained and what it scores."""
    from huggingface_hub import EvalResult, ModelCardData

    c = model.config
    task_name = model.task or "unknown"
    results = []
    rows = []
    if evaluation:
        setting = evaluation["protocol"]["setting"]
        key = result_key(evaluation["protocol"]["metric"])
        with_success = key == "success_rate"  # a return-scored task has no success column
        for r in evaluation["results"]:
            results.append(EvalResult(
                task_type="reinforcement-learning", task_name="Offline reinforcement learning",
                dataset_type=task_name, dataset_name=title or task_name, dataset_config=f"{setting}={r[setting]}",
                metric_type=key, metric_name=f"{key.replace('_', ' ')} ({setting} = {r[setting]}, "
                                             f"{r['episodes']} episodes)", metric_value=r[key]))
            success = f" {r['success_rate']:.2f} |" if with_success else ""
            rows.append(f"| {r[setting]} | {r['episodes']} |{success} {r['mean_return']:.3f} ± {r['return_sem']:.3f} |")
    data = ModelCardData(library_name="rate_core", tags=["offline-rl", "reinforcement-learning", c.mode, task_name],
                         model_name=repo_id.split("/")[-1], eval_results=results or None)
    training = "\n".join(f"- {key}: {value}" for key, value in sorted(model.training_info.items())) or "- not recorded"
    table = ""
    if rows:
        protocol = evaluation["protocol"]
        actions = "sampled" if protocol["sample_actions"] else "argmax"
        if protocol["sample_actions"] and protocol.get("temperature", 1.0) != 1.0:
            actions += f" (temperature {protocol['temperature']})"
        table = (f"\n## Evaluation\n\n{protocol['episodes']} episodes per setting, "
                 f"{actions} actions, target return "
                 f"{protocol['target_return']} (`python -m training.evaluate`):\n\n"
                 f"| {protocol['setting']} | episodes |{' success |' * with_success} return |\n"
                 f"| --- | --- |{' --- |' * with_success} --- |\n"
                 + "\n".join(rows) + "\n")
    cap = TASKS[model.task].demo_step_cap if model.task in TASKS else None
    video_md = (f"\n## Example episode\n\nSeed 0, the most likely action at each step"
                f"{f', the first {cap} steps' if cap else ''} (not the evaluation's protocol).\n\n"
                f"<video src=\"{video}\" controls></video>\n") if video else ""
    if c.mode == "dt":
        shape = (f"a Decision Transformer: {c.n_layer} layers of width {c.d_model}, {c.n_head} heads of {c.d_head}, "
                 f"no memory: it acts on a sliding window of the last {c.segment_steps} steps")
    else:
        shape = (f"a `{c.mode}` memory transformer: {c.n_layer} layers of width {c.d_model}, {c.n_head} heads of "
                 f"{c.d_head}, {c.num_mem_tokens} memory tokens, Transformer-XL cache {c.mem_len}, segments of "
                 f"{c.context_length} steps read {c.sections} at a time in training")
    body = f"""
# {c.mode.upper()} on {title or task_name}

From rate_core (RATE: Recurrent Action Transformer with Memory, arXiv 2306.09459), {shape};
{model.num_parameters():,} parameters. Weights are safetensors (no pickle). Loading needs `rate_core`, the
library of the repository that pushed this model (`pip install -e .` in its checkout).

```python
from rate_core.hub import load_reference
model = load_reference("hf://{repo_id}")
```

## Model config

```json
{json.dumps(vars(c), indent=2)}
```

## Training

{training}
{table}{video_md}"""
    return f"---\n{data.to_yaml()}\n---\n{body}"
