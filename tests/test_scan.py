"""One folder scan (``fewshot_studio/data/scan.py``): the streamed walk in sorted order, the
nested / flat class-folder rule, and the CLI and the GUI controller finding the same classes
in the same folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bad_input_helpers import deny_listing

from fewshot_studio.cli.label import support_classes
from fewshot_studio.data.scan import class_folders, iter_images, scan_images
from fewshot_studio.errors import UserError


def _touch(*paths: Path) -> list[Path]:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")  # the scan looks at names only
    return sorted(p.absolute() for p in paths)


# names whose Path order is not their string order ("a/x" < "a-b" < "a.b": parts compare
# first), upper case, spaces, digits and non-ASCII
TRICKY = ["a", "a-b", "a.b", "A", "a b", "a0", "\u00e9t\u00e9", "\u00df", "\u65e5\u672c", "Z"]


def _tricky_tree(root: Path) -> list[Path]:
    """Images under every TRICKY folder name, nested two deep, beside same-named files."""
    made = []
    for d in TRICKY:
        made += [root / f"{d}.png", root / d / "x.jpg", root / d / f"{d}.png"]
        made += [root / d / e / "y.png" for e in TRICKY[:4]]
    return _touch(*made)


def _walk_sorted(root: Path) -> list[Path]:
    """The reference: every image under ``root`` by os.walk (hidden folders pruned), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if f.endswith((".png", ".jpg"))
                  and not f.startswith(".")]
    return sorted(found)


def test_the_stream_is_the_sorted_scan(tmp_path: Path) -> None:
    """``iter_images`` yields, one at a time, exactly the sorted list (Path order, parts
    first) that ``scan_images`` returns; hidden, non-image, linked folders and link loops
    left out; ``recursive=False``: the top folder's images only."""
    want = _tricky_tree(tmp_path / "q")
    _touch(tmp_path / "q" / ".hidden" / "h.png", tmp_path / "q" / "a" / ".h.png")
    (tmp_path / "q" / "a" / "notes.txt").write_text("x")
    (tmp_path / "q" / "a" / "loop").symlink_to(tmp_path / "q")  # a loop, not followed
    (tmp_path / "q" / "link.png").symlink_to(tmp_path / "q" / "a")  # a folder named .png
    assert want == _walk_sorted(tmp_path / "q")  # the reference sees the same files
    rel = [str(p.relative_to(tmp_path / "q")) for p in want]
    assert rel[:3] == ["A/A/y.png", "A/A.png", "A/a/y.png"]
    assert rel.index("a/x.jpg") < rel.index("a-b.png") < rel.index("a.b/x.jpg")
    assert sorted(want, key=str) != want  # not the paths' string order
    stream = list(iter_images(tmp_path / "q"))
    assert stream == want
    scan = scan_images(tmp_path / "q")
    assert list(scan) == want and scan.total == len(want)
    counted = scan_images(tmp_path / "q", keep=False)
    assert list(counted) == [] and counted.total == len(want)
    top = [p for p in want if p.parent == tmp_path / "q"]
    assert list(iter_images(tmp_path / "q", recursive=False)) == top


def test_the_stream_lists_a_folder_when_it_gets_there(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Lazy: the first image comes after listing only the folders on its branch (memory is
    the open folders' entries, not every path)."""
    _tricky_tree(tmp_path / "q")
    listed: list[str] = []
    real = os.scandir

    def scandir(path: str) -> os.ScandirIterator[str]:
        listed.append(os.path.relpath(path, tmp_path / "q"))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stream = iter_images(tmp_path / "q")
    assert listed == []
    assert next(stream).relative_to(tmp_path / "q") == Path("A/A/y.png")
    assert listed == [".", "A", "A/A"]
    assert next(stream).relative_to(tmp_path / "q") == Path("A/A.png")
    assert listed == [".", "A", "A/A"]


def test_the_stream_reports_what_it_left_out(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreadable sub-folders (in order) and excluded images land in the report as the walk
    passes them; the query folder itself unreadable is a UserError on the first step."""
    want = _tricky_tree(tmp_path / "q")
    for locked in ("a.b", "a-b/a"):
        deny_listing(monkeypatch, tmp_path / "q" / locked)
    scan = scan_images(tmp_path / "q", exclude=[tmp_path / "q" / "Z", tmp_path / "q" / "a0.png"])
    assert [(f.relative_to(tmp_path / "q"), why) for f, why in scan.unreadable] == [
        (Path("a-b/a"), "Permission denied"), (Path("a.b"), "Permission denied")]
    assert scan.excluded == {tmp_path / "q" / "Z": 6, tmp_path / "q" / "a0.png": 1}
    assert list(scan) == [p for p in want if not str(p.relative_to(tmp_path / "q")).startswith(
        ("a.b/", "a-b/a/", "Z/", "a0.png"))]
    deny_listing(monkeypatch, tmp_path / "q")
    stream = iter_images(tmp_path / "q")  # the checks that need no listing come at once
    with pytest.raises(UserError, match="cannot read folder"):
        next(stream)


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
