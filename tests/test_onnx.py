"""ONNX export of model.embed, its parity with torch, and the backends agreeing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import COLOURS, make_checkpoint, make_queries, make_support

from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.engine.backends import (
    IdentityBackend,
    OnnxBackend,
    TorchBackend,
    select_backend,
    torch_cuda_works,
)
from fewshot_studio.engine.onnx_export import export_embed_onnx, max_abs_difference
from fewshot_studio.engine.session import LabelingSession
from fewshot_studio.errors import UserError
from fewshot_studio.io.checkpoint import load_checkpoint

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("onnx") / "tiny.safetensors")


def test_export_matches_torch(ckpt: Path, tmp_path: Path) -> None:
    c = load_checkpoint(ckpt)
    model = c.build()
    out = export_embed_onnx(model, c.preprocess, tmp_path / "m.onnx", metadata=c.metadata())
    assert max_abs_difference(model, out, c.preprocess, batch_sizes=(1, 5)) < 1e-4
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert '"image_size": 32' in props["preprocess"] and "fewshot_studio" in props
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_backends_agree_on_real_images(ckpt: Path, tmp_path: Path) -> None:
    from fewshot_studio.data.images import load_and_preprocess

    c = load_checkpoint(ckpt)
    model = c.build()
    make_queries(tmp_path / "q")
    x = np.stack([load_and_preprocess(p, c.preprocess)
                  for p in sorted((tmp_path / "q").glob("*.jpg"))])
    onnx_file = export_embed_onnx(model, c.preprocess, tmp_path / "m.onnx")
    a = OnnxBackend(onnx_file).embed(x)
    b = TorchBackend(model).embed(x)
    assert a.shape == b.shape == (len(x), 16 * 2 * 2)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert OnnxBackend(onnx_file).info.name == "onnxruntime"


def test_sessions_on_both_backends_agree(ckpt: Path, tmp_path: Path) -> None:
    support = make_support(tmp_path / "s")
    make_queries(tmp_path / "q")
    queries = LabelingSession.scan_queries(tmp_path / "q")
    results = {}
    for backend in ("onnxruntime", "torch"):
        settings = LabelSettings(unknown_threshold=0.0, device="cpu")
        cache = tmp_path / f"{backend}.sqlite"
        with LabelingSession(ckpt, settings, cache_path=cache, backend=backend) as s:
            s.set_support(support)
            list(s.run(queries))
            assert s.backend.name == backend and s.backend.device == "cpu"
            results[backend] = s.predictions()
    onnx_p, torch_p = results["onnxruntime"], results["torch"]
    assert [p.label for p in onnx_p] == [p.label for p in torch_p]
    for a, b in zip(onnx_p, torch_p, strict=True):
        assert a.label in COLOURS
        for (la, pa), (lb, pb) in zip(a.top, b.top, strict=True):
            assert la == lb and abs(pa - pb) < 1e-3


def test_onnx_file_is_cached_per_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c.sqlite"
    with LabelingSession(ckpt, cache_path=cache, backend="onnxruntime") as s:
        assert s.backend.detail == "not started"
        info = s.prepare()
        assert info.name == "onnxruntime" and "CPUExecutionProvider" in info.detail
        assert s.counters.extra["onnx_exports"] == 1
        path = s.onnx_path()
    with LabelingSession(ckpt, cache_path=cache, backend="onnxruntime") as s:
        s.prepare()
        assert s.counters.extra.get("onnx_exports", 0) == 0 and s.onnx_path() == path
    assert path.parent == tmp_path / "onnx"


def test_select_backend(ckpt: Path, tmp_path: Path) -> None:
    c = load_checkpoint(ckpt)
    model = c.build()
    calls = []

    def onnx_path() -> Path:
        calls.append(1)
        return export_embed_onnx(model, c.preprocess, tmp_path / "m.onnx")

    b = select_backend(model, c.preprocess, onnx_path, device="cpu")
    assert b.info.name == "onnxruntime" and b.info.device == "cpu" and calls == [1]
    t = select_backend(model, c.preprocess, onnx_path, device="cpu", prefer="torch")
    assert isinstance(t, TorchBackend) and calls == [1]
    with pytest.raises(UserError, match="unknown device"):
        select_backend(model, c.preprocess, onnx_path, device="tpu")
    if not torch_cuda_works():
        with pytest.raises(UserError, match="cuda"):
            select_backend(model, c.preprocess, onnx_path, device="cuda", prefer="torch")

    class Identity(torch.nn.Module):
        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return x

    assert isinstance(select_backend(Identity(), c.preprocess, onnx_path), IdentityBackend)
