"""The backend decision: one table (``BACKEND_SPECS``), one decision (``plan_backend``) read
by both ``select_backend`` and the session before anything is built; declared capabilities
(``embed_is_identity``, ``linear_logits``, ``probabilities``) instead of probes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_fixtures import make_checkpoint

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.engine import backends
from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.engine.backends import (
    BACKEND_NAMES,
    IdentityBackend,
    check_runnable,
    plan_backend,
    select_backend,
)
from fewshot_studio.engine.session import LabelingSession
from fewshot_studio.errors import UserError
from fewshot_studio.models import create_backbone, create_method
from fewshot_studio.models.base import LinearLogits

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _machine(monkeypatch: pytest.MonkeyPatch, providers: list[str], torch_cuda: bool) -> None:
    monkeypatch.setattr(backends, "onnxruntime_providers", lambda: list(providers))
    monkeypatch.setattr(backends, "torch_cuda_works", lambda: torch_cuda)


@pytest.mark.parametrize(("providers", "torch_cuda", "device", "prefer", "expected"), [
    ([CPU], False, "auto", "auto", ("onnxruntime", "cpu")),
    ([], False, "auto", "auto", ("torch", "cpu")),  # onnxruntime not installed
    ([CPU], True, "auto", "auto", ("torch", "cuda")),
    ([CPU, CUDA], False, "auto", "auto", ("onnxruntime", "cuda")),
    ([CPU, CUDA], True, "cuda", "auto", ("torch", "cuda")),
    ([CPU, CUDA], True, "auto", "onnxruntime", ("onnxruntime", "cuda")),
    ([CPU], True, "auto", "onnxruntime", ("torch", "cuda")),  # its CUDA fallback
    ([CPU, CUDA], False, "auto", "torch", ("torch", "cpu")),
    ([CPU, CUDA], True, "cpu", "auto", ("onnxruntime", "cpu")),
    ([], False, "auto", "onnxruntime", ("torch", "cpu")),
])
def test_plan_reads_the_table(monkeypatch: pytest.MonkeyPatch, providers: list[str],
                              torch_cuda: bool, device: str, prefer: str,
                              expected: tuple[str, str]) -> None:
    _machine(monkeypatch, providers, torch_cuda)
    plan = plan_backend(device, prefer)
    assert (plan.name, plan.device) == expected
    assert plan.info().detail == "not started"
    assert plan_backend(device, prefer, identity=True).info() == IdentityBackend.INFO


def test_backend_names_are_the_table() -> None:
    assert tuple(s.name for s in backends.BACKEND_SPECS) == BACKEND_NAMES
    assert set(BACKEND_NAMES) == {"onnxruntime", "torch"}
    assert ("auto", *BACKEND_NAMES) == backends.BACKENDS


@pytest.mark.parametrize(("providers", "torch_cuda", "device", "prefer", "message"), [
    ([CPU], False, "cuda", "auto", "no working CUDA"),
    ([], False, "cpu", "onnxruntime", "onnxruntime is not installed"),
    ([CPU, CUDA], False, "cuda", "torch", "torch has no working CUDA"),
])
def test_what_cannot_run_is_a_user_error(monkeypatch: pytest.MonkeyPatch, providers: list[str],
                                         torch_cuda: bool, device: str, prefer: str,
                                         message: str) -> None:
    _machine(monkeypatch, providers, torch_cuda)
    with pytest.raises(UserError, match=message):
        check_runnable(device, prefer)


def test_the_session_shows_the_plan_before_building(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    for prefer in ("auto", "torch"):
        with LabelingSession(ckpt, LabelSettings(device="cpu"), cache_path=tmp_path / "c.db",
                             backend=prefer) as s:
            plan = plan_backend("cpu", prefer)
            assert (s.backend.name, s.backend.device, s.backend.detail) == (
                plan.name, plan.device, "not started")
            built = s.prepare()
            assert (built.name, built.device) == (plan.name, plan.device)


class _NeverEmbed(torch.nn.Module):
    """A model that declares its embed is the identity and fails if it is ever run."""

    embed_is_identity = True

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("embed was called to probe a capability")


def test_identity_is_declared_not_probed(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    huge = Preprocess(image_size=12000, channels=3)  # a probe this size would need 73 GB
    backend = select_backend(_NeverEmbed(), huge, lambda: tmp_path / "never.onnx")  # type: ignore[arg-type]
    assert isinstance(backend, IdentityBackend)
    x = torch.rand(2, 3, 4, 4).numpy()
    assert (backend.embed(x) == x).all()
    # building a session runs nothing through the model either
    from fewshot_studio.models.protonet import ProtoNet

    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    monkeypatch.setattr(ProtoNet, "embed", _NeverEmbed.embed)
    with LabelingSession(ckpt, cache_path=tmp_path / "c.db") as s:
        assert s.backend.name in BACKEND_NAMES and not s.model.embed_is_identity


def _form_logits(form: LinearLogits, q: torch.Tensor) -> torch.Tensor:
    return form.scale * (q @ form.weight.t() + form.bias
                         - form.norm_coef * q.pow(2).sum(-1, keepdim=True))


def test_linear_logits_is_declared_by_euclidean_predictors() -> None:
    """The head's one-matrix-product path is what the method declares: Euclidean
    prototypes and many-shot head, not the cosine distance nor another model's predictors;
    the logits it describes are the predictor's."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 16, generator=g), torch.arange(3).repeat(3)
    q = torch.randn(5, 16, generator=g)
    euclid = create_method("protonet", create_backbone("conv4", in_channels=1, image_size=28))
    cosine = create_method("protonet", create_backbone("conv4", in_channels=1, image_size=28),
                           distance="cosine")
    euclid.scale = 0.5
    protos = euclid.fit(x, y, 3)
    form = euclid.linear_logits(protos)
    assert form is not None
    torch.testing.assert_close(_form_logits(form, q), protos(q), atol=1e-4, rtol=1e-4)
    no_folds = torch.zeros(0, 9, dtype=torch.bool)
    head, _ = euclid.fit_head(x, y, 3, no_folds, 1e-4, 5)
    form = euclid.linear_logits(head)
    assert form is not None
    torch.testing.assert_close(_form_logits(form, q), head(q), atol=1e-4, rtol=1e-4)
    assert cosine.linear_logits(cosine.fit(x, y, 3)) is None
    assert cosine.linear_logits(cosine.fit_head(x, y, 3, no_folds, 1e-4, 5)[0]) is None
    assert cosine.linear_logits(protos) is None  # another model's predictor


def test_probabilities_are_the_tempered_softmax_by_default() -> None:
    model = create_method("protonet", create_backbone("conv4", in_channels=1, image_size=28))
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    torch.testing.assert_close(model.probabilities(z), torch.softmax(z, -1))
    torch.testing.assert_close(model.probabilities(z, 2.0), torch.softmax(z / 2.0, -1))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_the_linear_scorer_equals_the_predictors(temperature: float) -> None:
    """The head's one-matrix-product scorer (the many-shot head's probabilities, the
    prototypes' largest calibrated logit in the same product) gives what calling the
    predictors gives; the cosine model takes the generic path."""
    from fewshot_studio.engine.api import EngineCounters
    from fewshot_studio.engine.head import PredictionHead

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 16, generator=g) * 2, torch.arange(3).repeat(4)
    q = torch.randn(40, 16, generator=g) * 2
    for distance, linear in (("euclidean", True), ("cosine", False)):
        model = create_method("protonet", create_backbone("conv4", in_channels=1,
                                                          image_size=28), distance=distance)
        protos = model.fit(x, y, 3)
        head, _ = model.fit_head(x, y, 3, torch.zeros(0, 12, dtype=torch.bool), 1e-4, 20)
        scorer = PredictionHead(model, temperature, EngineCounters()).scorer(head, protos)
        assert scorer.linear is linear
        probs, largest = scorer(q)
        torch.testing.assert_close(probs, torch.softmax(head(q) / temperature, -1),
                                   atol=1e-5, rtol=1e-4)
        assert largest is not None
        torch.testing.assert_close(largest, protos(q).max(-1).values / temperature,
                                   atol=1e-3, rtol=1e-4)
