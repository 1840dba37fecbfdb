"""ProtoNet: logits equal a hand computation; options; learns separable data quickly."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fewshot_studio.models import METHODS, build_model, create_backbone, create_method, model_spec
from fewshot_studio.models.protonet import ProtoNet


class Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


def test_registered() -> None:
    assert "protonet" in METHODS
    assert METHODS.get("protonet").factory is ProtoNet


def test_logits_equal_hand_computation() -> None:
    model = ProtoNet(Identity())
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # prototypes (1, 0) and (0, 3); squared distances by hand
    expected = -torch.tensor([[0.0 + 1.0, 1.0 + 4.0], [1.0 + 9.0, 0.0 + 0.0]])
    logits = model(support, labels, query)
    assert torch.allclose(logits, expected, atol=1e-5)
    loss = model.loss(logits, torch.tensor([0, 1]))
    manual = -(torch.log_softmax(expected, 1)[0, 0] + torch.log_softmax(expected, 1)[1, 1]) / 2
    assert loss.item() == pytest.approx(manual.item(), abs=1e-5)


def test_cosine_and_learned_scale() -> None:
    model = ProtoNet(Identity(), distance="cosine", scale=4.0, learn_scale=True)
    support = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    query = torch.tensor([[3.0, 3.0], [1.0, 0.0]])
    logits = model(support, torch.tensor([0, 1]), query)
    s = 2 ** -0.5
    assert torch.allclose(logits, 4.0 * torch.tensor([[s, s], [1.0, 0.0]]), atol=1e-5)
    logits.sum().backward()
    assert isinstance(model.scale, nn.Parameter) and model.scale.grad is not None
    assert model.config() == {"distance": "cosine", "scale": 4.0, "learn_scale": True,
                              "pool": "flatten"}
    with pytest.raises(ValueError):
        ProtoNet(Identity(), distance="manhattan")


def test_embed_flatten_vs_avg_and_predictor_refine() -> None:
    backbone = create_backbone("conv4", in_channels=3, image_size=32, pool_layers=2)
    x = torch.randn(4, 3, 32, 32)
    flat = ProtoNet(backbone, pool="flatten").eval()
    avg = ProtoNet(backbone, pool="avg").eval()
    with torch.no_grad():
        assert flat.embed(x).shape == (4, 64 * 8 * 8)
        e = avg.embed(x)
        assert e.shape == (4, 64)
        assert torch.allclose(e, backbone(x).mean((2, 3)), atol=1e-6)
        pred = avg.fit(e, torch.tensor([0, 1, 0, 1]))
        assert pred.prototypes.shape == (2, 64)
        refined = pred.refine(e, n_iters=2)
        assert refined(e).shape == (4, 2)
        assert not torch.equal(refined.prototypes, pred.prototypes)


def test_spec_round_trip() -> None:
    bcfg = {"in_channels": 1, "image_size": 28}
    model = create_method("protonet", create_backbone("conv4", **bcfg), distance="cosine",
                          pool="avg")
    spec = model_spec(model, "conv4", bcfg)
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x = torch.randn(6, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        assert torch.allclose(model(x, y, x), rebuilt(x, y, x))


def _episode(g: torch.Generator, n_way: int, n_shot: int, n_query: int,
             templates: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    classes = torch.randperm(templates.shape[0], generator=g)[:n_way]

    def draw(k: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n_way).repeat_interleave(k)
        x = templates[classes[y]] + 0.6 * torch.randn(len(y), *templates.shape[1:], generator=g)
        return x, y

    sx, sy = draw(n_shot)
    qx, qy = draw(n_query)
    return sx, sy, qx, qy


def test_learns_separable_generated_data() -> None:
    """Conv4 ProtoNet on 'classes' = fixed random blob images + noise: well above chance
    on unseen classes after a few dozen episodes."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    blobs = (torch.rand(40, 1, 8, 8, generator=g) > 0.5).float()
    templates = nn.functional.interpolate(blobs, size=28, mode="nearest")
    train_t, test_t = templates[:30], templates[30:]
    model = ProtoNet(create_backbone("conv4", in_channels=1, image_size=28, hidden=32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            accs = []
            for _ in range(10):
                sx, sy, qx, qy = _episode(g, 5, 1, 5, test_t)
                accs.append((model(sx, sy, qx).argmax(1) == qy).float().mean().item())
        model.train()
        return sum(accs) / len(accs)

    for _ in range(30):
        sx, sy, qx, qy = _episode(g, 5, 1, 5, train_t)
        loss = model.loss(model(sx, sy, qx), qy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = evaluate()
    assert acc > 0.8, f"accuracy {acc:.2f} on 5-way unseen classes (chance 0.2)"
