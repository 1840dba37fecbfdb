"""The embedding pipeline's device-decode path (issue 15): a backend that declares
``decodes_on_device`` (torch on CUDA) gets its images from ``data/gpu_decode.py`` instead of
the pool's Pillow decode; every other backend keeps today's path untouched.

Without a GPU the path is driven by a CPU stand-in: a ``TorchBackend`` on the CPU that
declares ``decodes_on_device``. With gpu_decode's Pillow fallback (no nvJPEG on the CPU) its
features must equal the normal torch path's bit for bit; with a stand-in nvJPEG (Pillow's
full-size decode) the plain JPEGs take the device resize. The last test runs only on CUDA."""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import colour_image, make_checkpoint
from fixtures_data import write_bad_files, write_odd_files
from PIL import Image

from fewshot_studio.data import gpu_decode
from fewshot_studio.data.images import image_to_uint8
from fewshot_studio.engine import backends
from fewshot_studio.engine import embedding as embedding_mod
from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.engine.backends import IdentityBackend, TorchBackend, torch_cuda_works
from fewshot_studio.engine.session import LabelingSession

BATCH = 3


class _DeviceDecodingCpu(TorchBackend):
    """A CPU stand-in for torch on CUDA: declares that it decodes on its device."""

    decodes_on_device = True


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Plain JPEGs (small and large: draft scale), PNGs, a grayscale JPEG, odd formats and
    bad files, interleaved so every batch mixes them."""
    root = tmp_path_factory.mktemp("gpu_decode_images")
    names = ["red", "green", "blue"]
    for i in range(9):
        img = colour_image(names[i % 3], i, size=(48 + 8 * i, 36 + 4 * i))
        img.save(root / f"c{i:02d}.jpg", quality=90)
        img.save(root / f"p{i:02d}.png")
    colour_image("blue", 50, size=(400, 300)).save(root / "big.jpg", quality=88)
    colour_image("red", 51).convert("L").save(root / "gray.jpg", quality=90)
    write_odd_files(root)
    write_bad_files(root)
    (root / "empty.jpg").write_bytes(b"")
    return sorted(p for p in root.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _session(ckpt: Path, cache: Path, tta: bool = False) -> LabelingSession:
    settings = LabelSettings(device="cpu", batch_size=BATCH, tta=tta)
    return LabelingSession(ckpt, settings, cache_path=cache, backend="torch")


def _collect(stream: Iterator[tuple[int, list[np.ndarray | str]]]
             ) -> list[np.ndarray | str]:
    out: list[np.ndarray | str] = []
    for start, results in stream:
        assert start == len(out)  # batches come in order
        out.extend(results)
    return out


@pytest.fixture
def on_device(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Sessions build the device-decoding stand-in; returns the paths each ``start_batch``
    call was given (so a test sees the device path ran, and on what)."""
    calls: list[list[str]] = []
    real = embedding_mod.start_batch

    def spy(paths: Sequence[str], *args: object, **kw: object) -> gpu_decode.PendingBatch:
        calls.append([str(p) for p in paths])
        return real(paths, *args, **kw)  # type: ignore[arg-type]

    def build(model: torch.nn.Module, *args: object, **kw: object) -> TorchBackend:
        return _DeviceDecodingCpu(model, "cpu")

    monkeypatch.setattr(embedding_mod, "start_batch", spy)
    monkeypatch.setattr(embedding_mod, "select_backend", build)
    return calls


def _reference(ckpt: Path, cache: Path, paths: list[Path], tta: bool = False,
               monkeypatch: pytest.MonkeyPatch | None = None) -> list[np.ndarray | str]:
    """The normal path (torch on the CPU, the pool's Pillow decode), with the
    :func:`on_device` patches undone for the while."""
    if monkeypatch is None:
        with _session(ckpt, cache, tta) as s:
            return _collect(s.embedding.stream(paths))
    with monkeypatch.context() as m:
        m.setattr(embedding_mod, "select_backend", backends.select_backend)
        m.setattr(embedding_mod, "start_batch", gpu_decode.start_batch)
        return _reference(ckpt, cache, paths, tta)


def _same(a: list[np.ndarray | str], b: list[np.ndarray | str]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, str) or isinstance(y, str):
            assert x == y
        else:
            assert x.dtype == y.dtype and np.array_equal(x, y)


def test_cpu_backends_do_not_decode_on_device(tmp_path: Path, checkpoint: Path,
                                              images: list[Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch on the CPU, ONNX Runtime and the identity declare no device decode, and the
    pipeline never calls gpu_decode for them."""
    assert not TorchBackend(torch.nn.Identity(), "cpu").decodes_on_device
    assert not IdentityBackend().decodes_on_device
    calls: list[object] = []
    monkeypatch.setattr(embedding_mod, "start_batch", lambda *a, **k: calls.append(a))
    for backend in ("torch", "onnxruntime"):
        settings = LabelSettings(device="cpu", batch_size=BATCH)
        with LabelingSession(checkpoint, settings, cache_path=tmp_path / f"{backend}.db",
                             backend=backend) as s:
            out = _collect(s.embedding.stream(images[:6]))
            assert s.embedding.embedder is not None
            assert not s.embedding.embedder.decodes_on_device
        assert sum(not isinstance(r, str) for r in out) > 0
    assert calls == []


@pytest.mark.parametrize("tta", [False, True])
def test_device_path_equals_the_pool_path(tmp_path: Path, checkpoint: Path,
                                          images: list[Path], on_device: list[list[str]],
                                          monkeypatch: pytest.MonkeyPatch, tta: bool) -> None:
    """Pillow fallback (no nvJPEG): the same features bit for bit, the same error rows, in
    the same order, and the same counters."""
    monkeypatch.setattr(gpu_decode, "nvjpeg_decoder", lambda device: None)
    ref = _reference(checkpoint, tmp_path / "ref.db", images, tta, monkeypatch)
    with _session(checkpoint, tmp_path / "dev.db", tta) as s:
        out = _collect(s.embedding.stream(images))
        counters = s.counters
    _same(out, ref)
    errors = [r for r in out if isinstance(r, str)]
    assert len(errors) >= 4 and len(errors) < len(out) - 10  # both kinds are exercised
    assert sum(len(c) for c in on_device) == len(images)  # every file went the device way
    assert counters.embedded == len(out) - len(errors)
    assert counters.extra.get("nvjpeg_decoded") == 0


def _full_decode(datas: list[bytes], gray: bool) -> list[torch.Tensor]:
    """The CPU stand-in for nvJPEG: Pillow's full-size decode (no draft scale)."""
    out = []
    for d in datas:
        img = Image.open(io.BytesIO(d))
        out.append(torch.from_numpy(image_to_uint8(img.convert("L" if gray else "RGB"))))
    return out


def test_stand_in_nvjpeg_and_cache_hits(tmp_path: Path, checkpoint: Path,
                                        images: list[Path], on_device: list[list[str]],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain JPEGs take the device decode and resize (a stand-in decoder on the CPU): the
    same error rows, features within the draft emulation's tolerance of the pool path's;
    a second run reads only the files the first did not cache."""
    monkeypatch.setattr(gpu_decode, "nvjpeg_decoder", lambda device: _full_decode)
    ref = _reference(checkpoint, tmp_path / "ref.db", images, monkeypatch=monkeypatch)
    first = images[: len(images) // 2]
    with _session(checkpoint, tmp_path / "dev.db") as s:
        head = _collect(s.embedding.stream(first))
        assert s.counters.cache_hits == 0
        on_device.clear()
        out = _collect(s.embedding.stream(images))
        assert s.counters.cache_hits == len(first)
        plain = s.counters.extra["nvjpeg_decoded"]
    assert sorted(p for c in on_device for p in c) == [str(p) for p in images[len(first):]]
    routed = [p for p, r in zip(images, ref, strict=True) if not isinstance(r, str)
              and gpu_decode.plain_jpeg_info(p.read_bytes()) is not None]
    assert plain == len(routed) > 0  # over both runs: each file was decoded once
    assert len(routed) < sum(p.suffix == ".jpg" for p in images)  # CMYK etc. go to Pillow
    _same(out[: len(first)], head)
    assert [r if isinstance(r, str) else "" for r in out] == \
        [r if isinstance(r, str) else "" for r in ref]
    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    # measured: <= 0.016 (the draft-scale images), 0 for the rest
    assert all(rel(x, y) <= 0.05 for x, y in zip(out, ref, strict=True)  # type: ignore[arg-type]
               if not isinstance(x, str))
    # which would not hide misordered rows: neighbours (other colours, sizes) differ by ~0.45
    feats = [r for r in ref if not isinstance(r, str)]
    assert np.median([rel(a, b) for a, b in itertools.pairwise(feats)]) > 0.3


def test_cancel_mid_run(tmp_path: Path, checkpoint: Path, images: list[Path],
                        on_device: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing the generator after the first batch stops the run: no more batches start,
    queued reads are cancelled (reads of later files are held until then: only those already
    running in a pool worker happen), only the finished batch is cached, and close() leaves
    no decode thread."""
    first_files = {str(p) for p in images[:BATCH]}
    gate, late = threading.Event(), []
    real_read = gpu_decode._read

    def gated(path: str, *args: object) -> object:
        if str(path) not in first_files:
            late.append(path)
            gate.wait(10)
        return real_read(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(gpu_decode, "_read", gated)
    with _session(checkpoint, tmp_path / "dev.db") as s:
        gen = s.embedding.stream(images)
        start, first = next(gen)
        assert (start, len(first)) == (0, BATCH)
        gen.close()
        gate.set()
        assert len(on_device) == 4 < -(-len(images) // BATCH)  # batch 0, prefetch + 1 more
    assert len(late) <= embedding_mod.decode_workers() < 3 * BATCH
    assert not [t for t in threading.enumerate() if t.name.startswith("fewshot-device-decode")]
    on_device.clear()
    with _session(checkpoint, tmp_path / "dev.db") as s:
        again = _collect(s.embedding.stream(images))
        assert s.counters.cache_hits == BATCH
    assert not first_files & {p for c in on_device for p in c}
    _same(again[:BATCH], first)


@pytest.mark.skipif(not torch_cuda_works(), reason="needs a working CUDA")
def test_cuda_parity(tmp_path: Path, checkpoint: Path, images: list[Path]) -> None:
    """On a GPU: torch on CUDA decodes on the device (nvJPEG when torchvision has it) and
    gives the CPU path's error rows and, within tolerance, its features."""
    ref = _reference(checkpoint, tmp_path / "ref.db", images)
    settings = LabelSettings(device="cuda", batch_size=BATCH)
    with LabelingSession(checkpoint, settings, cache_path=tmp_path / "gpu.db",
                         backend="torch") as s:
        out = _collect(s.embedding.stream(images))
        assert s.embedding.embedder is not None and s.embedding.embedder.decodes_on_device
        nvjpeg = gpu_decode.nvjpeg_decoder("cuda") is not None
        assert (s.counters.extra.get("nvjpeg_decoded", 0) > 0) == nvjpeg
    assert [r if isinstance(r, str) else "" for r in out] == \
        [r if isinstance(r, str) else "" for r in ref]
    for x, y in zip(out, ref, strict=True):
        if not isinstance(x, str):
            assert np.abs(x - y).max() <= 0.05 * max(1.0, float(np.abs(y).max()))
