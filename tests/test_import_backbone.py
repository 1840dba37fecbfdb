"""Bring your own backbone (``import-backbone``): tiny ONNX embedding models built here become
checkpoints whose features are the ONNX model's own, read their input settings from the
options, the metadata or the input shape, label a folder end to end, and bad models or
outputs are refused with one line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from engine_fixtures import COLOURS, colour_image, make_support
from torch import nn

from fewshot_studio.cli import main
from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.engine.export import read_csv
from fewshot_studio.engine.onnx_export import quantize_embed_onnx, synthetic_calibration
from fewshot_studio.engine.session import LabelingSession
from fewshot_studio.errors import UserError
from fewshot_studio.io.backbone_import import InputOptions, import_onnx
from fewshot_studio.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fewshot_studio.models.finetune import can_finetune

# the tests build their models with torch's TorchScript exporter (fast, no onnxscript)
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy:DeprecationWarning")


class TinyEmbedder(nn.Module):
    """``(n, 3, H, W)`` (or NHWC) -> ``(n, 8)``: a conv, global mean, a linear map."""

    def __init__(self, nhwc: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.nhwc = nhwc
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(9, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        pooled = torch.cat([torch.relu(self.conv(x)).mean((2, 3)), x.mean((2, 3))], 1)
        return self.fc(pooled)


class TinyMaps(nn.Module):
    """``(n, 3, H, W)`` -> ``(n, 5, H/2, W/2)`` feature maps (average-pooled by ProtoNet)."""

    def __init__(self, nhwc: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


def export(path: Path, size: int = 32, nhwc: bool = False, batch: str | int | None = "n",
           metadata: dict[str, str] | None = None, maps: bool = False) -> Path:
    """A tiny model as ONNX; ``batch``: a name (any batch size), None (fixed at 1) or a
    fixed size."""
    model = (TinyMaps() if maps else TinyEmbedder(nhwc)).eval()
    shape = (2, size, size, 3) if nhwc else (2, 3, size, size)
    if not isinstance(batch, str):
        shape = (batch or 1, *shape[1:])
    axes = {"pixels": {0: batch}, "embedding": {0: batch}} if isinstance(batch, str) else None
    torch.onnx.export(model, (torch.randn(*shape),), str(path), input_names=["pixels"],
                      output_names=["embedding"], dynamic_axes=axes, dynamo=False)
    if metadata:
        m = onnx.load(str(path))
        for k, v in metadata.items():
            m.metadata_props.add(key=k, value=v)
        onnx.save(m, str(path))
    return path


def test_imported_features_are_the_onnx_models(tmp_path: Path) -> None:
    src = export(tmp_path / "enc.onnx", metadata={"mean": "[0.5, 0.4, 0.3]",
                                                 "std": "0.2,0.2,0.2", "image_size": "32"})
    ckpt = import_onnx(src)
    assert ckpt.preprocess.image_size == 32 and ckpt.preprocess.mean == (0.5, 0.4, 0.3)
    assert ckpt.preprocess.std == (0.2, 0.2, 0.2) and ckpt.model["backbone"] == "onnx"
    out = save_checkpoint(tmp_path / "enc.safetensors", ckpt)
    model = load_checkpoint(out).build("cpu")
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    direct = ort.InferenceSession(str(src)).run(["embedding"], {"pixels": x})[0]
    torch.testing.assert_close(model.embed(torch.from_numpy(x)), torch.from_numpy(direct))
    assert not can_finetune(model)  # ONNX has no gradients
    # the graph travels inside the checkpoint: the source file is not needed any more
    src.unlink()
    torch.testing.assert_close(load_checkpoint(out).build("cpu").embed(torch.from_numpy(x)),
                               torch.from_numpy(direct))


def test_nhwc_and_a_fixed_batch_are_read_from_the_input(tmp_path: Path) -> None:
    src = export(tmp_path / "nhwc.onnx", size=24, nhwc=True, batch=None)
    ckpt = import_onnx(src)
    assert ckpt.preprocess.image_size == 24
    assert ckpt.preprocess.mean == (0.485, 0.456, 0.406)  # ImageNet's, by default
    model = ckpt.build("cpu")
    assert model.backbone.layout == "NHWC"
    x = torch.randn(3, 3, 24, 24)
    expected = TinyEmbedder(nhwc=True).eval()(x.permute(0, 2, 3, 1)).detach()
    torch.testing.assert_close(model.embed(x), expected, atol=1e-5, rtol=1e-4)
    # options win over what the model says
    ckpt = import_onnx(src, InputOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                         layout="NHWC"))
    assert ckpt.preprocess.mean == (0.5, 0.5, 0.5)


def test_bad_models_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        import_onnx(junk)
    dyn = tmp_path / "dyn.onnx"
    model = TinyEmbedder().eval()
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(dyn), input_names=["pixels"],
                      output_names=["embedding"], dynamo=False,
                      dynamic_axes={"pixels": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(UserError, match="--image-size"):
        import_onnx(dyn)
    assert import_onnx(dyn, InputOptions(image_size=20)).preprocess.image_size == 20
    ext = tmp_path / "ext.onnx"
    m = onnx.load(str(export(tmp_path / "e.onnx")))
    onnx.save_model(m, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    with pytest.raises(UserError, match="external data"):
        import_onnx(ext)


def test_a_graph_with_a_fixed_batch_of_four_runs_any_number_of_images(tmp_path: Path) -> None:
    from fewshot_studio.engine.backends import OnnxBackend
    from fewshot_studio.engine.onnx_export import export_embed_onnx

    ckpt = import_onnx(export(tmp_path / "enc.onnx", batch=4))  # probed with 2 images
    model = ckpt.build("cpu")
    graph = export_embed_onnx(model, ckpt.preprocess, tmp_path / "embed.onnx")
    backend = OnnxBackend(graph)
    torch.manual_seed(4)
    x = torch.randn(9, 3, 32, 32)
    with torch.no_grad():
        ref = TinyEmbedder().eval()(x).numpy()
    for n in (1, 3, 4, 5, 9):  # partial last calls are padded, their extra rows dropped
        np.testing.assert_allclose(model.embed(x[:n]).numpy(), ref[:n], atol=1e-5)
        np.testing.assert_allclose(backend.embed(x[:n].numpy()), ref[:n], atol=1e-5)


def test_a_truncated_graph_is_refused_before_it_runs(tmp_path: Path) -> None:
    ckpt = import_onnx(export(tmp_path / "enc.onnx"))
    ckpt.state_dict["backbone.graph"] = ckpt.state_dict["backbone.graph"][:-10]
    out = save_checkpoint(tmp_path / "cut.safetensors", ckpt)
    with pytest.raises(CheckpointError, match=r"backbone\.graph"):
        load_checkpoint(out)


def test_cli_imports_and_labels_a_folder(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = export(tmp_path / "enc.onnx", size=32)
    out = tmp_path / "enc.safetensors"
    assert main(["import-backbone", str(src), "--out", str(out), "--mean", "0.5", "0.5",
                 "0.5", "--std", "0.25", "0.25", "0.25"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_checkpoint(out).preprocess.std == (0.25, 0.25, 0.25)
    support = make_support(tmp_path / "support", per_class=3)
    query = tmp_path / "query"
    query.mkdir()
    truth = {}
    for name, paths in support.items():
        q = query / f"{name}.png"
        q.write_bytes(paths[0].read_bytes())
        truth[q.name] = name
    labels = tmp_path / "labels.csv"
    assert main(["label", "--checkpoint", str(out), "--support", str(tmp_path / "support"),
                 "--query", str(query), "--out", str(labels), "--cache",
                 str(tmp_path / "cache.sqlite"), "--unknown-threshold", "0"]) == 0
    rows = {r["path"]: r["label"] for r in read_csv(labels)}
    assert rows == truth and len(truth) == len(COLOURS)
    # an ONNX graph has no gradients: fine-tuning is refused in one line
    assert main(["label", "--checkpoint", str(out), "--support", str(tmp_path / "support"),
                 "--query", str(query), "--out", str(tmp_path / "ft.csv"), "--cache",
                 str(tmp_path / "cache.sqlite"), "--adapt", "finetune"]) == 2
    assert "fine-tuning does not apply" in capsys.readouterr().err
    # export-onnx writes the embedded graph (nothing to trace), checked against torch
    assert main(["export-onnx", "--checkpoint", str(out), "--out",
                 str(tmp_path / "enc.embed.onnx")]) == 0
    assert "max abs difference vs torch" in capsys.readouterr().out
    # an existing file that is not an imported checkpoint is never overwritten
    other = tmp_path / "notes.safetensors"
    other.write_text("mine")
    assert main(["import-backbone", str(src), "--out", str(other)]) != 0
    assert other.read_text() == "mine"
    assert main(["import-backbone", str(src), "--out", str(out)]) == 0  # ours: replaced


def _label(ckpt: Path, support: dict[str, list[Path]], queries: list[Path], prefer: str,
           cache: Path) -> tuple[str, dict[str, str], np.ndarray, np.ndarray]:
    """Label ``queries`` with the ``prefer`` backend: (backend name, labels by file name,
    the backend's features of random images, the torch model's)."""
    with LabelingSession(ckpt, LabelSettings(device="cpu"), cache_path=cache,
                         backend=prefer) as s:
        s.set_support(support)
        for _ in s.run(queries):
            pass
        labels = {p.path.name: str(p.label) for p in s.predictions()}
        x = np.random.default_rng(2).normal(size=(5, 3, 32, 32)).astype(np.float32)
        feats = s.embedding.embedder.embed(x)
        ref = s.model.embed(torch.from_numpy(x)).numpy()
        return s.backend.name, labels, feats, ref


@pytest.mark.parametrize("kind", ["vectors", "maps", "nhwc_fixed_batch"])
def test_the_engine_runs_the_embedded_graph(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            kind: str) -> None:
    src = export(tmp_path / "enc.onnx", maps=kind == "maps", nhwc=kind == "nhwc_fixed_batch",
                 batch=None if kind == "nhwc_fixed_batch" else "n")
    ckpt = save_checkpoint(tmp_path / "enc.safetensors", import_onnx(src))
    support = make_support(tmp_path / "support", per_class=2)
    queries = []
    for name in COLOURS:
        queries.append(tmp_path / f"q_{name}.png")
        colour_image(name, 7).save(queries[-1])
    with caplog.at_level(logging.WARNING):
        ort_run = _label(ckpt, support, queries, "onnxruntime", tmp_path / "a.sqlite")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    torch_run = _label(ckpt, support, queries, "torch", tmp_path / "b.sqlite")
    assert (ort_run[0], torch_run[0]) == ("onnxruntime", "torch")
    assert ort_run[1] == torch_run[1] == {q.name: q.stem[2:] for q in queries}
    np.testing.assert_allclose(ort_run[2], ort_run[3], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(torch_run[2], ort_run[3], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["maps", "nhwc_fixed_batch"])
def test_the_embedded_graph_quantises(tmp_path: Path, kind: str) -> None:
    from fewshot_studio.engine.backends import OnnxBackend
    from fewshot_studio.engine.onnx_export import export_embed_onnx

    fixed = kind == "nhwc_fixed_batch"
    ckpt = import_onnx(export(tmp_path / "enc.onnx", maps=not fixed, nhwc=fixed,
                              batch=None if fixed else "n"))
    model = ckpt.build("cpu")
    fp32 = export_embed_onnx(model, ckpt.preprocess, tmp_path / "embed.onnx")
    int8 = quantize_embed_onnx(fp32, tmp_path / "embed.int8.onnx",
                               synthetic_calibration(ckpt.preprocess))
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)
    x = synthetic_calibration(ckpt.preprocess, 4, seed=5)
    got = OnnxBackend(int8, precision="int8").embed(x)  # a fixed batch runs 1 at a time
    ref = model.embed(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (4, 8 if fixed else 5)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99, cos


def test_the_app_opens_an_onnx_model_as_a_checkpoint(qtbot, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Open checkpoint… on an ``.onnx`` file: imported (in a worker) into the user data
    folder and used; the same file again reuses that import; a broken one is reported and the
    checkpoint in use is kept."""
    from _gui_helpers import shown_window
    from PySide6.QtWidgets import QFileDialog

    from fewshot_studio.paths import user_data_dir

    src = export(tmp_path / "enc.onnx")
    chosen = [src]
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(chosen[0]), ""))
    w = shown_window(qtbot)
    cmd = w.commands
    with qtbot.waitSignal(cmd.checkpoint_changed, timeout=20_000) as sig:
        w.acts.open_checkpoint.trigger()
    out = Path(sig.args[0])
    assert out == user_data_dir() / "imported" / "enc.safetensors"
    assert w.labeling.checkpoint == str(out) and cmd.onnx_import.thread_ident is not None
    assert load_checkpoint(out).training["imported"]["file"] == "enc.onnx"
    stamp = out.stat().st_mtime_ns
    with qtbot.waitSignal(cmd.checkpoint_changed, timeout=20_000) as sig:
        w.acts.open_checkpoint.trigger()
    assert sig.args[0] == str(out) and out.stat().st_mtime_ns == stamp
    assert len(list(out.parent.iterdir())) == 1
    errors: list[tuple] = []
    w.show_error = lambda *a: errors.append(a)
    chosen[0] = tmp_path / "junk.onnx"
    chosen[0].write_bytes(b"not a model")
    with qtbot.waitSignal(cmd.checkpoint_kept, timeout=20_000):
        w.acts.open_checkpoint.trigger()
    assert len(errors) == 1 and "not a readable ONNX model" in errors[0][1]
    assert w.labeling.checkpoint == str(out)
    w.close()


def test_import_into_a_folder_never_replaces_another_file(tmp_path: Path) -> None:
    from fewshot_studio.io.backbone_import import import_onnx_into

    folder = tmp_path / "imported"
    folder.mkdir()
    (folder / "enc.safetensors").write_text("mine")  # not a checkpoint: kept
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    a = import_onnx_into(export(tmp_path / "a" / "enc.onnx"), folder)
    b = import_onnx_into(export(tmp_path / "b" / "enc.onnx", maps=True), folder)  # other bytes
    assert (a.name, b.name) == ("enc-2.safetensors", "enc-3.safetensors")
    assert import_onnx_into(tmp_path / "a" / "enc.onnx", folder) == a  # the same: reused
    assert (folder / "enc.safetensors").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == [
        "enc-2.safetensors", "enc-3.safetensors", "enc.safetensors"]
