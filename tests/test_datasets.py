"""Class-folder datasets (folder and zip in place), splits, preload into memory, Omniglot."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import (
    bad_file_bytes,
    image_bytes,
    make_class_folder,
    make_class_zip,
    pattern_image,
    write_bad_files,
)

from fewshot_studio.data.datasets import (
    ClassFolderDataset,
    ConcatClassFolderDataset,
    InMemoryImages,
    default_data_dir,
    load_split,
    omniglot_dataset,
    omniglot_vinyals,
    open_dataset,
    preload,
    preload_steps,
    split_classes,
    split_rotation,
)
from fewshot_studio.data.images import load_uint8
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError

PRE = Preprocess(image_size=16, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
OMNIGLOT = default_data_dir() / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background.zip").is_file(), reason="shared Omniglot data not found"
)


def test_flat_folder(tmp_path: Path) -> None:
    names = make_class_folder(tmp_path, n_classes=3, n_per_class=4)
    (tmp_path / "class00" / "notes.txt").write_text("not an image")
    (tmp_path / "class00" / ".hidden.png").write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "a.png").write_bytes(b"x")
    (tmp_path / "stray.png").write_bytes(image_bytes(pattern_image(0, 0, 8)))  # no class
    ds = ClassFolderDataset(tmp_path)
    assert ds.class_names == names == ["class00", "class01", "class02"]
    assert len(ds) == 12 and ds.targets.dtype == np.int64
    assert ds.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.samples[0] == ("class00/000.png", 0)
    assert ds.read_bytes("class01/002.png") == (tmp_path / "class01" / "002.png").read_bytes()


def test_nested_folder_leaf_classes(tmp_path: Path) -> None:
    names = make_class_folder(tmp_path, n_classes=5, n_per_class=2, nested=True)
    ds = ClassFolderDataset(tmp_path)
    assert ds.class_names == names
    assert ds.class_names[:2] == ["alpha0/char00", "alpha0/char01"]


@pytest.mark.parametrize("top", ["images_background", None])
def test_zip_in_place_strips_single_top_folder(tmp_path: Path, top: str | None) -> None:
    z = tmp_path / "d.zip"
    names = make_class_zip(z, n_classes=4, n_per_class=3, nested=True, top_folder=top)
    ds = ClassFolderDataset(z)
    assert ds.is_zip and ds.class_names == names
    member, ci = ds.samples[4]
    assert ds.class_names[ci] in member
    assert ds.load(member, 1).mode == "L"
    assert not any(tmp_path.glob("**/*.png"))  # nothing extracted


def test_zip_single_class_top_folder_not_stripped(tmp_path: Path) -> None:
    z = tmp_path / "one.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("cats/1.png", image_bytes(pattern_image(0, 0, 8)))
        zf.writestr("cats/2.png", image_bytes(pattern_image(0, 1, 8)))
        zf.writestr("__MACOSX/cats/._1.png", b"junk")
    assert ClassFolderDataset(z).class_names == ["cats"]


def test_classes_select_and_order(tmp_path: Path) -> None:
    make_class_folder(tmp_path, n_classes=4, n_per_class=2)
    ds = ClassFolderDataset(tmp_path, classes=["class03", "class01"])
    assert ds.class_names == ["class03", "class01"]
    assert [m.split("/")[0] for m, _ in ds.samples] == ["class03"] * 2 + ["class01"] * 2
    with pytest.raises(UserError, match="'nope' not found"):
        ClassFolderDataset(tmp_path, classes=["class01", "nope"])
    view = ds.select(["class00"])
    assert view.class_names == ["class00"] and len(view) == 2


def test_min_images_drops_small_classes(tmp_path: Path) -> None:
    make_class_folder(tmp_path, n_classes=3, n_per_class=3)
    (tmp_path / "class01" / "000.png").unlink()
    with pytest.warns(UserWarning, match="class01"):
        ds = ClassFolderDataset(tmp_path, min_images=3)
    assert ds.class_names == ["class00", "class02"] and ds.excluded_classes == ["class01"]


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"dataset not found: .*missing"):
        ClassFolderDataset(tmp_path / "missing")
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"not a folder or a \.zip"):
        ClassFolderDataset(tmp_path / "x.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders with images"):
        ClassFolderDataset(tmp_path / "empty")


def test_pickle_roundtrip_reads_zip(tmp_path: Path) -> None:
    z = tmp_path / "d.zip"
    make_class_zip(z, n_classes=2, n_per_class=2)
    ds = ClassFolderDataset(z)
    ds.read_bytes(ds.samples[0][0])  # opens a handle
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2.read_bytes(ds.samples[1][0]) == ds.read_bytes(ds.samples[1][0])


@pytest.mark.parametrize("as_zip", [False, True])
def test_preload_matches_single_image_path(tmp_path: Path, as_zip: bool) -> None:
    root = tmp_path / ("d.zip" if as_zip else "d")
    if as_zip:
        make_class_zip(root, n_classes=3, n_per_class=4, size=40)
    else:
        make_class_folder(root, n_classes=3, n_per_class=4, size=40)
    ds = ClassFolderDataset(root)
    mem = preload(ds, PRE, num_workers=2)
    assert mem.images.dtype == torch.uint8 and mem.images.shape == (12, 3, 16, 16)
    assert torch.equal(mem.targets, torch.from_numpy(ds.targets))
    assert mem.class_names == ds.class_names and mem.skipped == []
    # identical to the engine's single-image path (same decode + resize)
    ref = load_uint8(ds.read_bytes(ds.samples[5][0]), PRE)
    assert np.array_equal(mem.images[5].numpy(), ref)
    mem1 = preload(ds, PRE, num_workers=1, size=8)
    assert mem1.images.shape == (12, 3, 8, 8)


def test_preload_rotations_make_classes(tmp_path: Path) -> None:
    make_class_folder(tmp_path, n_classes=2, n_per_class=3, mode="L")
    ds = ClassFolderDataset(tmp_path)
    pre = Preprocess(image_size=12, channels=1)
    base = preload(ds, pre)
    mem = preload(ds, pre, rotations=(0, 90, 180, 270))
    assert mem.num_classes == 8 and len(mem) == 24
    assert mem.class_names[:5] == [
        "class00/rot000",
        "class00/rot090",
        "class00/rot180",
        "class00/rot270",
        "class01/rot000",
    ]
    assert torch.bincount(mem.targets).tolist() == [3] * 8
    # image i of class01/rot090 is image i of class01 turned 90 degrees (counter-clockwise)
    rot = mem.images[mem.targets == 5]
    orig = base.images[base.targets == 1]
    assert torch.equal(rot, torch.rot90(orig, 1, dims=(2, 3)))
    assert not torch.equal(rot, orig)
    with pytest.raises(ValueError, match="multiples of 90"):
        preload(ds, pre, rotations=(0, 45))


def test_preload_skips_corrupt_files_with_warning(tmp_path: Path) -> None:
    make_class_folder(tmp_path, n_classes=2, n_per_class=3)
    planted = write_bad_files(tmp_path / "class01")
    ds = ClassFolderDataset(tmp_path)
    assert len(ds) == 6 + len(planted)
    with pytest.warns(UserWarning, match=r"skipped 5 unreadable file\(s\)") as rec:
        mem = preload(ds, PRE)
    assert len(mem) == 6 and torch.bincount(mem.targets).tolist() == [3, 3]
    reasons = {Path(p).name: r for p, r in mem.skipped}
    assert set(reasons) == set(planted)
    for name, expected in planted.items():
        assert expected in reasons[name]
        assert name in str(rec[0].message)


def test_preload_zip_with_corrupt_member(tmp_path: Path) -> None:
    z = tmp_path / "d.zip"
    make_class_zip(z, n_classes=2, n_per_class=2, top_folder=None)
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("class00/bad.jpg", bad_file_bytes()["truncated.jpg"][0])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        mem = preload(ClassFolderDataset(z), PRE)
    assert len(mem) == 4 and mem.skipped[0][0].endswith("d.zip/class00/bad.jpg")


def test_preload_steps_progress_and_payload(tmp_path: Path) -> None:
    make_class_folder(tmp_path, n_classes=2, n_per_class=5)
    steps = list(preload_steps(ClassFolderDataset(tmp_path), PRE, chunk=3))
    dones = [s.done for s in steps]
    assert dones == sorted(dones) and dones[-1] == 10 and steps[-1].total == 10
    assert isinstance(steps[-1].payload, InMemoryImages) and len(steps[-1].payload) == 10
    assert len(steps) >= 4  # 0, chunks..., final


def test_in_memory_subset_normalize_sampler(tmp_path: Path) -> None:
    make_class_folder(tmp_path, n_classes=4, n_per_class=5)
    mem = preload(ClassFolderDataset(tmp_path), PRE).to("cpu")
    sub = mem.subset_classes(["class03", "class01"])
    assert sub.class_names == ["class03", "class01"] and len(sub) == 10
    assert torch.equal(sub.images[:5], mem.images[mem.targets == 1])  # order kept
    assert sub.targets.tolist() == [1] * 5 + [0] * 5
    with pytest.raises(UserError, match="'zzz' not in the loaded data"):
        mem.subset_classes(["zzz"])
    x = InMemoryImages.normalize(mem.images[:2], PRE)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x, (mem.images[:2].float() / 255 - 0.5) / 0.5)
    ep = sub.sampler(2, 2, 3, seed=0).sample()
    batch = sub.batch(ep.support, PRE)
    assert batch.shape == (4, 3, 16, 16)
    assert set(sub.targets[ep.query].tolist()) == set(ep.classes.tolist())


def test_concat_datasets(tmp_path: Path) -> None:
    make_class_zip(tmp_path / "a.zip", n_classes=2, n_per_class=2, top_folder="a")
    make_class_folder(tmp_path / "b", n_classes=5, n_per_class=2, nested=True)
    ds = ConcatClassFolderDataset([tmp_path / "a.zip", tmp_path / "b"])
    assert ds.class_names[:3] == ["class00", "class01", "alpha0/char00"] and len(ds) == 14
    mem = preload(ds, PRE)
    assert len(mem) == 14 and mem.skipped == []
    pick = ConcatClassFolderDataset(
        [tmp_path / "a.zip", tmp_path / "b"], classes=["alpha1/char00", "class01"]
    )
    assert pick.class_names == ["alpha1/char00", "class01"]
    assert pick.display_path(pick.samples[0][0]).endswith("b/alpha1/char00/000.png")
    assert isinstance(open_dataset([tmp_path / "a.zip", tmp_path / "b"]), ConcatClassFolderDataset)
    make_class_folder(tmp_path / "c", n_classes=1, n_per_class=2)
    with pytest.raises(UserError, match="'class00' is in both"):
        ConcatClassFolderDataset([tmp_path / "a.zip", tmp_path / "c"])
    with pytest.raises(UserError, match="'nope' not found"):
        ConcatClassFolderDataset([tmp_path / "a.zip"], classes=["nope"])


def test_split_files_and_helpers(tmp_path: Path) -> None:
    (tmp_path / "vinyals_mini.txt").write_text("A/c01/rot000\nA/c01/rot090\n\nB/c02/rot000\n")
    assert load_split("mini", tmp_path) == ["A/c01/rot000", "A/c01/rot090", "B/c02/rot000"]
    assert load_split(str(tmp_path / "vinyals_mini.txt")) == load_split("vinyals_mini", tmp_path)
    with pytest.raises(UserError, match="split file not found"):
        load_split("nope", tmp_path)
    assert split_rotation("A/c01/rot270") == ("A/c01", 270)
    assert split_rotation("A/c01") == ("A/c01", None)
    names = [f"X/c{i}/rot{r:03d}" for i in range(10) for r in (0, 90, 180, 270)]
    kept, held = split_classes(names, 3, seed=1)
    assert len(held) == 12 and len(kept) == 28
    assert {split_rotation(n)[0] for n in held}.isdisjoint({split_rotation(n)[0] for n in kept})
    assert split_classes(names, 3, seed=1) == (kept, held)


@needs_omniglot
def test_omniglot_background_zip_in_place() -> None:
    ds = omniglot_dataset("background")
    assert len(ds.class_names) == 964 and len(ds) == 19_280
    assert ds.class_names[0] == "Alphabet_of_the_Magi/character01"
    assert all(n.count("/") == 1 for n in ds.class_names)
    img = ds.load(ds.samples[0][0], 1)
    assert img.size == (105, 105) and img.mode == "L"


@needs_omniglot
def test_omniglot_vinyals_val_split() -> None:
    mem = omniglot_vinyals("val", size=14)
    names = load_split("val")
    assert mem.class_names == names and mem.num_classes == 688
    assert torch.bincount(mem.targets).tolist() == [20] * 688
    assert mem.images.shape == (688 * 20, 1, 14, 14) and mem.skipped == []
