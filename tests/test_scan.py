"""One folder scan (``fewshot_studio/data/scan.py``): the nested / flat class-folder rule, and
the CLI and the GUI controller finding the same classes in the same folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewshot_studio.cli.label import support_classes
from fewshot_studio.data.scan import class_folders, scan_images
from fewshot_studio.errors import UserError


def _touch(*paths: Path) -> list[Path]:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")  # the scan looks at names only
    return sorted(p.absolute() for p in paths)


def _nested(root: Path) -> dict[str, list[Path]]:
    return {"cat": _touch(root / "cat" / "b.png", root / "cat" / "a.jpg",
                          root / "cat" / "deeper" / "c.png"),
            "dog": _touch(root / "dog" / "d.jpeg")}


def test_nested_folder_one_class_per_sub_folder(tmp_path: Path) -> None:
    want = _nested(tmp_path / "s")
    _touch(tmp_path / "s" / "loose.png", tmp_path / "s" / ".hidden" / "x.png",
           tmp_path / "s" / "cat" / ".x.png")
    (tmp_path / "s" / "cat" / "notes.txt").write_text("not an image")
    assert class_folders(tmp_path / "s") == want  # loose / hidden / non-image files left out


def test_flat_folder_is_one_class_named_after_it(tmp_path: Path) -> None:
    want = _touch(tmp_path / "photos" / "b.png", tmp_path / "photos" / "a.png")
    (tmp_path / "photos" / "empty").mkdir()  # a sub-folder without images keeps it flat
    assert class_folders(tmp_path / "photos") == {"photos": want}


def test_nested_keeps_empty_classes_and_nothing_gives_no_classes(tmp_path: Path) -> None:
    _touch(tmp_path / "s" / "cat" / "a.png")
    (tmp_path / "s" / "none").mkdir()
    assert class_folders(tmp_path / "s") == {"cat": [(tmp_path / "s/cat/a.png").absolute()],
                                             "none": []}
    (tmp_path / "e" / "sub").mkdir(parents=True)
    assert class_folders(tmp_path / "e") == {"sub": []}
    (tmp_path / "z").mkdir()
    assert class_folders(tmp_path / "z") == {}


def test_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="support folder not found"):
        class_folders(tmp_path / "nope", what="support folder")
    with pytest.raises(UserError, match="query folder not found"):
        scan_images(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(UserError, match="is not a folder"):
        class_folders(tmp_path / "f.png")


def _gui_classes(qtbot, root: Path) -> dict[str, list[Path]]:
    """The classes the GUI's class controller imports from ``root`` (File > Import class
    folders, or a folder dropped on the class panel)."""
    from PySide6.QtGui import QUndoStack

    from fewshot_studio.gui.controllers.classes import ClassesController
    from fewshot_studio.gui.models.classes import ClassListModel

    model = ClassListModel()
    ctl = ClassesController(model, QUndoStack())
    messages: list[str] = []
    ctl.message.connect(messages.append)
    ctl.import_class_folders([root])
    qtbot.waitUntil(lambda: bool(messages), timeout=5000)
    return {name: model.spec(model.row_of(name)).examples for name in model.names()}


def _resolved(classes: dict[str, list[Path]]) -> dict[str, list[Path]]:
    return {name: [p.resolve() for p in images] for name, images in classes.items()}


def test_cli_and_gui_find_the_same_classes_in_a_nested_folder(qtbot, tmp_path: Path) -> None:
    want = _nested(tmp_path / "s")
    _touch(tmp_path / "s" / "loose.png")
    cli = support_classes(tmp_path / "s")
    assert cli == want
    assert _gui_classes(qtbot, tmp_path / "s") == _resolved(cli)


def test_cli_and_gui_find_the_same_class_in_a_flat_folder(qtbot, tmp_path: Path) -> None:
    want = _touch(tmp_path / "photos" / "a.png", tmp_path / "photos" / "b.png")
    assert _gui_classes(qtbot, tmp_path / "photos") == _resolved({"photos": want})
    # the CLI finds the same one class, and labeling needs two
    with pytest.raises(UserError, match=r"need at least 2 classes .* found 1"):
        support_classes(tmp_path / "photos")


def test_an_empty_class_folder_is_refused_by_the_cli_left_out_by_the_gui(
        qtbot, tmp_path: Path) -> None:
    want = _nested(tmp_path / "s")
    (tmp_path / "s" / "none").mkdir()
    with pytest.raises(UserError, match="'none' has no image files"):
        support_classes(tmp_path / "s")
    assert _gui_classes(qtbot, tmp_path / "s") == _resolved(want)
