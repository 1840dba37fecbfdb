"""``fewshot-studio duplicates``: exact copies (bytes) and resized, re-encoded copies (pixel
signatures) are grouped; different photos of one class are not; the output is as safe as
``label``'s."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from fewshot_studio.cli import main
from fewshot_studio.engine import duplicates as dup
from fewshot_studio.engine.export import DUPLICATES_COLUMNS, read_csv


def photo(cls: int, idx: int, w: int = 192, h: int = 144) -> Image.Image:
    """Photo ``idx`` of class ``cls``: the class's object (a textured blob) on a light
    background, placed, sized and lit differently in each photo (two photos of one class
    correlate up to ~0.97, near the threshold: a real test)."""
    rng = np.random.default_rng(1000 + cls)
    tex = Image.fromarray(np.uint8(rng.integers(0, 255, (12, 12, 3)))).resize(
        (w, h), Image.Resampling.BICUBIC)
    r = np.random.default_rng(10_000 * cls + idx)
    bg = np.full((h, w, 3), 235, np.float32) - np.linspace(0, 30, w)[None, :, None]
    img = Image.fromarray(np.uint8(bg))
    mask = Image.new("L", (w, h), 0)
    cx, cy = w / 2 + r.uniform(-0.12, 0.12) * w, h / 2 + r.uniform(-0.12, 0.12) * h
    s = r.uniform(0.8, 1.1)
    ImageDraw.Draw(mask).ellipse((cx - 0.3 * w * s, cy - 0.3 * h * s,
                                  cx + 0.3 * w * s, cy + 0.3 * h * s), fill=255)
    img.paste(tex, (0, 0), mask.filter(ImageFilter.GaussianBlur(2)))
    a = np.asarray(img, np.float32) * r.uniform(0.85, 1.1) + r.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.uint8(np.clip(a, 0, 255)))


def resized_q60(src: Path, dst: Path) -> None:
    """``src`` resized to 2/3 and saved as JPEG quality 60."""
    with Image.open(src) as im:
        im.convert("RGB").resize((im.width * 2 // 3, im.height * 2 // 3),
                                 Image.Resampling.LANCZOS).save(dst, "JPEG", quality=60)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """4 classes x 5 photos (JPEG q90, one class PNG), an exact copy, two 2/3 q60 copies, two
    identical junk files, a lone junk file and a flat image."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for c in range(4):
        for i in range(5):
            if c == 3:
                photo(c, i).save(root / f"c{c}_{i}.png")
            else:
                photo(c, i).save(root / f"c{c}_{i}.jpg", quality=90)
    shutil.copy2(root / "c0_0.jpg", root / "sub" / "c0_0 copy.jpg")
    resized_q60(root / "c1_1.jpg", root / "sub" / "c1_1_small.jpg")
    resized_q60(root / "c3_2.png", root / "c3_2_small.jpg")
    (root / "junk_a.jpg").write_bytes(b"not an image at all")
    (root / "junk_b.jpg").write_bytes(b"not an image at all")
    (root / "junk_c.jpg").write_bytes(b"another bad file")
    Image.new("RGB", (64, 48), (120, 120, 120)).save(root / "flat.png")
    return root


EXPECTED = [{"c0_0.jpg", "sub/c0_0 copy.jpg"}, {"c1_1.jpg", "sub/c1_1_small.jpg"},
            {"c3_2.png", "c3_2_small.jpg"}, {"junk_a.jpg", "junk_b.jpg"}]


def _groups(out: Path) -> list[set[str]]:
    rows = read_csv(out)
    groups: dict[str, set[str]] = {}
    for r in rows:
        groups.setdefault(r["group"], set()).add(r["path"])
    return sorted(groups.values(), key=lambda g: sorted(g))


def _run(folder: Path, out: Path, *extra: str) -> int:
    return main(["duplicates", str(folder), "--out", str(out),
                 "--cache", str(out.parent / "cache.sqlite"), *extra])


def test_finds_copies_and_not_other_photos(folder: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Exact copies and 2/3-size quality-60 copies are found; the 5 photos of each class are
    never paired; junk files pair by bytes; the CSV has the documented columns."""
    out = tmp_path / "dups.csv"
    assert _run(folder, out) == 0
    captured = capsys.readouterr()
    assert "4 groups of duplicates, 8 images, among 27 images" in captured.out
    assert "4 file(s) are not readable images (or are flat)" in captured.err
    assert out.read_text(encoding="utf-8").splitlines()[0] == ",".join(DUPLICATES_COLUMNS)
    assert _groups(out) == sorted(EXPECTED, key=lambda g: sorted(g))
    rows = read_csv(out)
    assert [int(r["group"]) for r in rows] == sorted(int(r["group"]) for r in rows)
    sims = {r["path"]: float(r["similarity"]) for r in rows}
    assert sims["c0_0.jpg"] == sims["junk_a.jpg"] == 1.0
    assert dup.DEFAULT_THRESHOLD <= sims["sub/c1_1_small.jpg"] < 1.0
    assert sims["c3_2_small.jpg"] >= dup.DEFAULT_THRESHOLD


def test_different_photos_of_a_class_stay_below_the_threshold(folder: Path) -> None:
    """The test data is hard: photos of one class correlate highly, but below the default;
    every copy above it."""
    sig = {p.relative_to(folder).as_posix(): dup.pixel_signature(p)
           for p in folder.rglob("*") if p.is_file()}
    same = [float(sig[f"c{c}_{i}.{'png' if c == 3 else 'jpg'}"]
                  @ sig[f"c{c}_{j}.{'png' if c == 3 else 'jpg'}"])
            for c in range(4) for i in range(5) for j in range(i + 1, 5)]
    assert 0.9 < max(same) < dup.DEFAULT_THRESHOLD
    assert float(sig["c1_1.jpg"] @ sig["sub/c1_1_small.jpg"]) > 0.995
    assert isinstance(sig["flat.png"], str) and "flat" in sig["flat.png"]
    assert sig["junk_c.jpg"] == "not an image"


def test_second_run_reads_no_image(folder: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Signatures come from the cache the second time (bad files too); the result is the
    same; a lower threshold finds more."""
    out = tmp_path / "dups.csv"
    assert _run(folder, out) == 0
    first = out.read_bytes()

    def boom(path: object) -> None:
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(dup, "pixel_signature", boom)
    assert _run(folder, out) == 0
    assert out.read_bytes() == first
    assert _run(folder, out, "--threshold", "0.5") == 0
    assert len(_groups(out)) < len(EXPECTED) or len(read_csv(out)) > 8


def test_output_safety(folder: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    """Never overwrites a file it did not write or an input image (exit 2, nothing written);
    replaces its own duplicates CSV or a labels CSV; bad arguments exit 2."""
    notes = tmp_path / "notes.csv"
    notes.write_text("group,path\nmine,keep\n")
    assert _run(folder, notes) == 2
    assert "will not overwrite" in capsys.readouterr().err
    assert notes.read_text() == "group,path\nmine,keep\n"
    image = folder / "c0_1.jpg"
    before = image.read_bytes()
    assert _run(folder, image) == 2
    assert "one of the input images" in capsys.readouterr().err
    assert image.read_bytes() == before
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,confidence,margin,status,error,top1,top1_prob,top2,"
                      "top2_prob,top3,top3_prob,corrected\n")
    assert _run(folder, labels) == 0 and _groups(labels)
    assert _run(folder, labels) == 0  # its own file again
    for bad in (["--threshold", "0"], ["--threshold", "1.5"]):
        assert _run(folder, tmp_path / "x.csv", *bad) == 2
    assert _run(tmp_path / "missing", tmp_path / "x.csv") == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_empty_folder_and_unreadable_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """No images: a header-only CSV, a warning, exit 1. A file that cannot be read at all (a
    dangling link) is listed as skipped (exit 1); the rest is still compared."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "d.csv"
    assert _run(empty, out) == 1
    assert "no images in" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == ",".join(DUPLICATES_COLUMNS) + "\n"
    d = tmp_path / "d"
    d.mkdir()
    photo(0, 0).save(d / "a.jpg", quality=90)
    shutil.copy(d / "a.jpg", d / "b.jpg")
    os.symlink(d / "gone.jpg", d / "dangling.jpg")  # listed, but cannot be read
    assert _run(d, out) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "dangling.jpg" in err
    assert _groups(out) == [{"a.jpg", "b.jpg"}]


def test_grouping_is_single_linkage_and_blockwise() -> None:
    """A chain A~B~C is one group, each member with its best similarity; pairs computed
    block by block equal the full matrix."""
    assert dup.group_pairs(5, [(0, 1, 0.99), (1, 2, 0.985), (3, 4, 1.0000002)]) == [
        [(0, 0.99), (1, 0.99), (2, 0.985)], [(3, 1.0), (4, 1.0)]]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = {(i, j) for i in range(50) for j in range(i + 1, 50) if x[i] @ x[j] >= 0.5}
    assert {(i, j) for i, j, _ in dup.similar_pairs(x, 0.5, block=7)} == full
