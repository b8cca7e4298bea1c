"""The progress protocol: library loops report Steps, the CLI draws them."""

from __future__ import annotations

from rcnn.progress import Step, report, tracked


def test_tracked_reports_after_each_item_and_report_ignores_none():
    steps: list[Step] = []
    seen = []
    for x in tracked("abc", steps.append, "letters"):
        seen.append((x, len(steps)))  # the step for x comes after x was handled
    assert seen == [("a", 1), ("b", 2), ("c", 3)]
    assert [(s.task, s.done, s.total) for s in steps] == [("letters", i, 3) for i in range(4)]
    report(None, "nothing", 1, 1)  # no callback: nothing happens
    assert list(tracked([1, 2], None, "quiet")) == [1, 2]


def test_cli_bar_shows_one_task_per_name(capsys):
    from rcnn.cli.progress import show_progress

    with show_progress() as show:
        show(Step("stage one", 1, 2, "slow"))
        show(Step("stage one", 2, 2, "3.5 img/s"))
        show(Step("stage two", 1, 5))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 2  # one bar per task name, the last update of each
    assert "stage one" in lines[0] and "2/2" in lines[0] and "3.5 img/s" in lines[0]
    assert "stage two" in lines[1] and "1/5" in lines[1]
