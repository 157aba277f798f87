"""Join datasets of one task into one, e.g. the teacher's data and a DAgger round's.

    python -m training.merge data/memory_maze/teacher data/memory_maze/dagger --out data/memory_maze/teacher_dagger

The episodes keep their order (the first dataset's, then the next one's); the new dataset's
meta.json names its sources. Where only some datasets have labels (collect --teacher), the others'
actions serve as their labels.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

from training.cli import OWN_DEFAULT, cli, folder_out_or_exit, run_main
from training.dataset import DatasetError, load_dataset, merge_datasets


@dataclass
class Args:
    """Join datasets of one task (folders written by python -m training.collect) into one."""

    sources: Annotated[tyro.conf.Positional[tuple[Path, ...]], OWN_DEFAULT]
    """dataset folders (at least two), in the order their episodes take"""
    out: Path
    """the new dataset's folder (an older dataset there is replaced; a folder holding anything else is
    refused; it may not be one of the sources)"""


def main(args: Args) -> Path:
    if len(args.sources) < 2:
        raise SystemExit("error: give at least two dataset folders to merge")
    if any(args.out.resolve() == source.resolve() for source in args.sources):
        raise SystemExit(f"error: --out {args.out} is one of the sources; write the merge to a new folder")
    folder_out_or_exit("--out", args.out)
    try:
        sources = [load_dataset(source) for source in args.sources]
        path = merge_datasets(args.out, sources)  # ValueError for a folder there that is not a dataset
        merged = load_dataset(path)
    except (DatasetError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    without = [str(source) for source, data in zip(args.sources, sources, strict=True) if data.aux_labels is None]
    if merged.aux_labels is None and len(without) < len(sources):  # train --aux-weight needs them on every step
        print(f"note: auxiliary labels (aux_labels.npy) left out: {', '.join(without)} has none")
    returns = merged.episode_returns()
    print(f"wrote {merged.num_episodes} episodes ({len(merged.actions):,} steps, mean return {np.mean(returns):.3f}) "
          f"from {len(sources)} datasets to {path}")
    return path


if __name__ == "__main__":
    run_main(main, cli(Args), "interrupted: nothing written (a dataset is put in place only when complete)")
