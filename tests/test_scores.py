"""training.scores: evaluations drawn against the protocol's setting."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.scores import Args, main, metric_and_error, plot_scores

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "checkpoints"


def _report(task, mode, setting, rows, metric_key="success_rate"):
    return {"task": task, "mode": mode, "checkpoint": f"runs/{task}/{mode}/model",
            "results": [{setting: value, "episodes": 100, metric_key: score, "mean_return": score,
                         "return_sem": 0.1} for value, score in rows]}


def test_the_error_bar_is_the_binomial_sem_for_success_and_the_return_sem_otherwise():
    assert metric_and_error({"success_rate": 0.5, "episodes": 100}, "success") == (0.5,
                                                                                    pytest.approx(math.sqrt(0.25 / 99)))
    assert metric_and_error({"success_rate": 1.0, "episodes": 100}, "success") == (1.0, 0.0)
    assert metric_and_error({"mean_return": 7.6, "return_sem": 0.575}, "return") == (7.6, 0.575)


def test_lines_by_setting_on_a_log_axis_where_the_values_span_a_factor_of_8():
    rate = _report("tmaze", "rate", "episode_length", [(150, 1.0), (300, 1.0), (9600, 1.0)])
    dt = _report("tmaze", "dt", "episode_length", [(150, 1.0), (300, 0.5)])
    figure = plot_scores([rate, dt])
    (axis,) = figure.axes
    assert axis.get_xscale() == "log" and axis.get_ylabel() == "success rate"
    assert [bars.lines[0].get_ydata().tolist() for bars in axis.containers] == [[1.0, 1.0, 1.0], [1.0, 0.5]]
    assert [t.get_text() for t in axis.get_legend().get_texts()] == [
        "in the training data (episode_length up to 150)", "tmaze/rate (rate)", "tmaze/dt (dt)"]
    (band,) = [patch for patch in axis.patches if patch.get_label().startswith("in the training data")]
    assert band.get_x() + band.get_width() == 150  # the registry's T-Maze datasets reach T = 150


def test_one_bar_per_evaluation_where_the_protocol_has_one_value():
    figure = plot_scores([_report("memory_maze", "rate", "step_cap", [(1000, 7.6)], "unused"),
                          _report("memory_maze", "dt", "step_cap", [(1000, 6.2)], "unused")], labels=["R", "D"])
    (axis,) = figure.axes
    assert [bar.get_height() for bar in axis.patches] == [7.6, 6.2]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["R", "D"] and axis.get_ylabel() == "mean return"
    figure = plot_scores([_report("memory_maze", "rate", "step_cap", [(1000, 7.6)], "unused")],
                         references={"paper RATE": 7.64})
    assert [line.get_ydata()[0] for line in figure.axes[0].get_lines() if line.get_linestyle() == "--"] == [7.64]


def test_evaluations_of_two_tasks_are_refused():
    with pytest.raises(ValueError, match="different tasks"):
        plot_scores([_report("tmaze", "rate", "episode_length", [(150, 1.0)]),
                     _report("memory_maze", "dt", "step_cap", [(1000, 6.2)])])


def test_the_cli_draws_shipped_checkpoints_folders(tmp_path, capsys):
    main(Args(evaluations=(ASSETS / "memory_maze/rate", ASSETS / "memory_maze/dt"), out=tmp_path / "mm.png"))
    out = capsys.readouterr().out
    assert "memory_maze/rate (rate)  1000: 7.600 +- 0.575" in out and "memory_maze/dt (dt)  1000: 6.200" in out
    assert Image.open(tmp_path / "mm.png").format == "PNG"
    main(Args(evaluations=(ASSETS / "memory_maze/rate",), out=tmp_path / "ref.png", reference=("paper RATE=7.64",)))
    with pytest.raises(SystemExit, match="expected LABEL=VALUE"):
        main(Args(evaluations=(ASSETS / "memory_maze/rate",), out=tmp_path / "r.png", reference=("paper=high",)))
    with pytest.raises(SystemExit, match="at least one evaluation"):
        main(Args(evaluations=()))
    with pytest.raises(SystemExit, match="must be a .png"):
        main(Args(evaluations=(ASSETS / "memory_maze/rate",), out=tmp_path / "mm.svg"))
    with pytest.raises(SystemExit, match=r"^error: --out .*nowhere/mm.png: cannot write a file there"):
        main(Args(evaluations=(ASSETS / "memory_maze/rate",), out=tmp_path / "nowhere" / "mm.png"))



def test_compare_and_scores_read_checkpoint_folders_alike_and_say_how_to_evaluate_one(tmp_path, capsys):
    from training.compare import Args as CompareArgs, main as compare_main

    compare_main(CompareArgs(first=ASSETS / "tmaze/rate/eval.json", second=ASSETS / "tmaze/dt"))
    out = capsys.readouterr().out
    assert f"B: {ASSETS / 'tmaze/dt'} (dt)" in out and "300      100     1.000     0.500   +0.500" in out
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    hint = (f"error: {folder} holds no eval.json; write it with python -m training.evaluate --checkpoint {folder} "
            f"--json {folder / 'eval.json'}")
    for run in (lambda: main(Args(evaluations=(folder,), out=tmp_path / "s.png")),
                lambda: compare_main(CompareArgs(first=folder, second=ASSETS / "tmaze/dt"))):
        with pytest.raises(SystemExit) as exit_:
            run()
        assert str(exit_.value) == hint
    with pytest.raises(SystemExit) as exit_:
        main(Args(evaluations=(tmp_path / "a.json",), out=tmp_path / "s.png"))
    assert str(exit_.value) == (f"error: {tmp_path / 'a.json'} does not exist; write it with python -m "
                                f"training.evaluate --checkpoint CHECKPOINT --json {tmp_path / 'a.json'}")
    with pytest.raises(SystemExit, match=r"model\.safetensors is not JSON"):
        main(Args(evaluations=(ASSETS / "tmaze/rate/model.safetensors",), out=tmp_path / "s.png"))


def test_an_evaluation_of_an_unknown_task_is_one_line_without_quotes(tmp_path):
    report = _report("nope", "rate", "episode_length", [(150, 1.0)])
    report["protocol"] = {"setting": "episode_length"}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit) as exit_:
        main(Args(evaluations=(tmp_path / "eval.json",), out=tmp_path / "s.png"))
    assert str(exit_.value).startswith("error: unknown task 'nope'; known tasks: ")


def test_two_evaluations_of_one_checkpoint_get_labels_that_say_how_they_differ():
    from training.scores import distinct_labels

    base = {"memory_horizon": None, "hide_actions": 0.0, "pixel_noise": 0.0, "seed": 0,
            "protocol": {"target_return": 1.0, "temperature": 1.0}}
    reports = [base, {**base, "memory_horizon": 1}, {**base, "seed": 0}]
    labels = distinct_labels(["tmaze/rate (rate)"] * 3 + ["tmaze/dt (dt)"], [*reports, base],
                             [Path("a.json"), Path("h1.json"), Path("again.json"), Path("dt.json")])
    assert labels == ["tmaze/rate (rate), memory horizon all [a.json]", "tmaze/rate (rate), memory horizon 1",
                      "tmaze/rate (rate), memory horizon all [again.json]", "tmaze/dt (dt)"]


def test_compare_plot_names_the_checkpoints_given_and_tells_two_evaluations_of_one_apart(tmp_path, monkeypatch):
    from training import compare

    drawn = []
    monkeypatch.setattr(compare, "save_png", lambda figure, out, **kwargs: drawn.append(figure) or out)
    # the shipped eval.json names the run that made the checkpoint; the axes name the folders given
    compare.main(compare.Args(first=ASSETS / "memory_maze/rate", second=ASSETS / "memory_maze/dt/eval.json",
                              plot=tmp_path / "p.png"))
    axis = drawn[-1].axes[0]
    assert axis.get_ylabel() == "A: return, memory_maze/rate (rate)"
    assert axis.get_xlabel() == "B: return, memory_maze/dt (dt)"
    # one checkpoint evaluated twice: the axes say which is which
    report = json.loads((ASSETS / "tmaze/rate/eval.json").read_text())
    (tmp_path / "h1.json").write_text(json.dumps({**report, "memory_horizon": 1}))
    compare.main(compare.Args(first=tmp_path / "h1.json", second=ASSETS / "tmaze/rate", plot=tmp_path / "q.png"))
    axis = drawn[-1].axes[0]
    assert axis.get_ylabel().endswith("(rate), memory horizon 1") and axis.get_xlabel().endswith("memory horizon all")
    from training.compare import evaluated_folder

    assert evaluated_folder(ASSETS / "tmaze/rate/eval.json") == ASSETS / "tmaze/rate"
    (tmp_path / "config.json").write_text("{}")  # another JSON beside a checkpoint: named by what it evaluated
    assert evaluated_folder(tmp_path / "h1.json") is None



def test_an_evaluation_without_results_is_refused_saying_so(tmp_path):
    report = json.loads((ASSETS / "tmaze/rate/eval.json").read_text())
    (tmp_path / "empty.json").write_text(json.dumps({**report, "results": []}))
    with pytest.raises(SystemExit, match=r"empty.json holds no results .*evaluate the checkpoint again"):
        main(Args(evaluations=(tmp_path / "empty.json",), out=tmp_path / "s.png"))



def test_a_dataset_given_as_an_evaluation_is_named_as_one(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"data is a dataset folder; give an evaluation"):
        main(Args(evaluations=(tmp_path / "data",), out=tmp_path / "s.png"))


def test_compare_plot_of_many_settings_is_a_grid_whose_text_fits_and_whose_near_points_merge(tmp_path):
    from PIL import Image

    from training import compare

    out = tmp_path / "mg.png"
    compare.main(compare.Args(first=ASSETS / "minigrid_memory/rate", second=ASSETS / "minigrid_memory/dt",
                              plot=out))
    width, height = Image.open(out).size
    assert height > width / 2  # six settings: two rows of three, not one strip 2,800 pixels wide
    pixels = np.asarray(Image.open(out).convert("L"))
    assert (pixels[-1] < 128).sum() == 0 and (pixels[0] < 128).sum() == 0  # no text cut at the edges
    figure = compare.plot_pairs(*(compare.load_evaluation(ASSETS / f"minigrid_memory/{m}/eval.json") for m in
                                  ("rate", "dt")))
    counts = [len(axis.collections[0].get_offsets()) for axis in figure.axes if axis.get_visible()]
    assert max(counts) <= 4  # returns within 4% of the range are one point, its count written on it
