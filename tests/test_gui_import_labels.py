"""File > Import labels: a path,label CSV (the app's own export reads back) or a folder of class
folders; query images become corrections, other images class examples, in one undo step;
unknown classes refuse the import with their names, missing files are counted."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import label_and_wait, make_image, wait_idle, window_with_classes

from fewshot_studio.gui.controllers import commands
from fewshot_studio.gui.main_window import MainWindow


@pytest.fixture
def data(tmp_path: Path) -> dict:
    query = tmp_path / "query"
    q = [make_image(query / f"img{i}.png", (200, 40, 40) if i < 3 else (40, 70, 220), i,
                    size=24).absolute() for i in range(6)]
    support = {n: [make_image(tmp_path / "support" / n / "s0.png", c, 50 + k, size=24)
                   .absolute()] for k, (n, c) in enumerate((("red", (220, 40, 40)),
                                                            ("blue", (40, 70, 220))))}
    extra = make_image(tmp_path / "more" / "blue_extra.png", (40, 70, 220), 60,
                       size=24).absolute()
    return {"root": tmp_path, "query": query, "q": q, "support": support, "extra": extra}


@pytest.fixture
def win(qtbot, data: dict):
    w = window_with_classes(qtbot, data["support"], data["query"], rows=6)
    yield w
    w.close()


def _import(qtbot, w: MainWindow, source: Path) -> None:
    worker = w.label_import.import_labels(source)
    qtbot.waitUntil(lambda: worker.is_done, timeout=10_000)
    qtbot.wait(50)  # the finished signal's slot


def test_a_csv_makes_corrections_and_examples_in_one_undo_step(qtbot, win, data) -> None:
    q, extra = data["q"], data["extra"]
    csv = data["root"] / "known.csv"
    csv.write_text("path,label\n"
                   f"{q[3].name},blue\n"  # relative to the query folder: a correction
                   f"{q[4]},blue\n"  # absolute, in the query folder: a correction
                   f"{extra},blue\n"  # elsewhere: an example of blue
                   "gone.png,red\n", encoding="utf-8")  # missing: counted, ignored
    label_and_wait(qtbot, win)
    messages: list[str] = []
    win.statusBar().messageChanged.connect(messages.append)
    depth = win.stack.count()
    _import(qtbot, win, csv)
    assert win.labeling.corrections == {q[3]: "blue", q[4]: "blue"}
    assert win.classes.support()["blue"] == [*data["support"]["blue"], extra]
    assert win.stack.count() == depth + 1  # one undo step
    assert any("2 corrections and 1 example" in m and "1 file not found" in m
               for m in messages), messages
    wait_idle(qtbot, win)
    assert {p.path: p.label for p in win.gallery_model.predictions()}[q[3]] == "blue"
    assert {q[3], q[4]} <= win.labeling.reviewed_paths()  # known labels count as reviewed
    win.stack.undo()
    assert win.labeling.corrections == {}
    assert win.classes.support()["blue"] == data["support"]["blue"]
    win.stack.redo()
    assert win.labeling.corrections == {q[3]: "blue", q[4]: "blue"}
    assert extra in win.classes.support()["blue"]


def test_unknown_classes_refuse_the_import_and_name_them(qtbot, win, data) -> None:
    errors: list[tuple] = []
    win.show_error = lambda *a: errors.append(a)
    csv = data["root"] / "odd.csv"
    csv.write_text(f"{data['q'][0]},green\n{data['q'][1]},red\n", encoding="utf-8")
    depth = win.stack.count()
    _import(qtbot, win, csv)
    assert len(errors) == 1 and errors[0][0] == "Cannot import labels"
    assert "“green”" in errors[0][1] and "nothing was changed" in errors[0][1]
    assert win.labeling.corrections == {} and win.stack.count() == depth
    _import(qtbot, win, data["root"] / "nope.csv")  # a path that is not there
    assert len(errors) == 2 and "not found" in errors[1][1]


def test_class_folders_through_the_file_menu(qtbot, win, data, monkeypatch) -> None:
    """A folder of class folders: here the query folder's own images, sorted into classes
    under another folder that the query scan does not see -> examples; plus copies inside
    the query folder -> corrections."""
    tree = data["query"] / "sorted"
    inside = make_image(tree / "blue" / "b.png", (40, 70, 220), 70, size=24).absolute()
    monkeypatch.setattr(commands.QFileDialog, "getExistingDirectory",
                        staticmethod(lambda *a, **k: str(tree)))
    with qtbot.waitSignal(win.labeling.scanned, timeout=10_000):
        win.commands.set_query_folder(data["query"])  # now with sorted/blue/b.png in it
    assert inside in win.gallery_model.paths()
    file_menu = win.menuBar().actions()[0].menu()
    sub = next(a.menu() for a in file_menu.actions() if a.menu()
               and a.text().replace("&", "") == "Import labels")
    assert win.acts.import_labels_folders in sub.actions()
    assert win.acts.import_labels_csv in sub.actions()
    win.acts.import_labels_folders.trigger()
    qtbot.waitUntil(lambda: win.labeling.corrections == {inside: "blue"}, timeout=10_000)


def test_the_apps_own_csv_export_reads_back(qtbot, win, data) -> None:
    label_and_wait(qtbot, win)
    win.correct_paths([data["q"][5]], 1)  # blue
    wait_idle(qtbot, win)
    out = data["root"] / "labels.csv"
    preds = win.gallery_model.predictions()
    with qtbot.waitSignal(win.export.finished, timeout=10_000):
        win.export.export_file("csv", preds, out, data["query"], win.classes.names())
    win.labeling.set_corrections({})
    _import(qtbot, win, out)
    assert win.labeling.corrections == {p.path: p.label for p in preds}
    assert win.labeling.corrections[data["q"][5]] == "blue"
