"""The embedding map's projections (engine/projection.py): PCA recovers known structure,
UMAP (only where umap-learn is installed) separates clusters, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_studio.engine.projection import pca, project_2d, umap_available


def _line_data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points spread along a known direction (std 10) and a second one (std 3) in 20-D,
    with small noise; returns (x, t along the first, u along the second)."""
    rng = np.random.default_rng(seed)
    d1 = rng.normal(size=20)
    d1 /= np.linalg.norm(d1)
    d2 = rng.normal(size=20)
    d2 -= d2 @ d1 * d1
    d2 /= np.linalg.norm(d2)
    t, u = rng.normal(0, 10, n), rng.normal(0, 3, n)
    x = 5 + np.outer(t, d1) + np.outer(u, d2) + rng.normal(0, 0.05, (n, 20))
    return x.astype(np.float32), t, u


def test_pca_finds_the_directions_of_largest_variance() -> None:
    x, t, u = _line_data()
    xy = pca(x)
    assert xy.shape == (400, 2) and xy.dtype == np.float32
    # the first component is the std-10 direction, the second the std-3 one (up to sign)
    assert abs(np.corrcoef(xy[:, 0], t)[0, 1]) > 0.999
    assert abs(np.corrcoef(xy[:, 1], u)[0, 1]) > 0.99
    assert xy[:, 0].std() == pytest.approx(10, rel=0.1)
    assert xy[:, 1].std() == pytest.approx(3, rel=0.15)
    assert abs(xy.mean(axis=0)).max() < 1e-3  # centred


def test_pca_is_deterministic_and_sign_fixed() -> None:
    x, _, _ = _line_data()
    a, b = pca(x), pca(x[::-1].copy())[::-1]
    np.testing.assert_allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(pca(-x), -a, atol=1e-3)  # mirrored data: mirrored map...
    # ...because the sign is fixed by the loadings, not the scores
    x3 = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], np.float32)
    assert (np.diff(pca(x3)[:, 0]) > 0).all()


def test_pca_separates_two_clusters_and_handles_degenerate_input() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0, 0.1, (50, 8)) + 3
    b = rng.normal(0, 0.1, (50, 8)) - 3
    xy = pca(np.vstack([a, b]))
    assert (np.sign(xy[:50, 0]) != np.sign(xy[50:, 0])).all()
    assert pca(np.zeros((0, 5))).shape == (0, 2)
    one_dim = pca(np.arange(6, dtype=np.float32).reshape(6, 1))
    assert one_dim.shape == (6, 2) and (one_dim[:, 1] == 0).all()


def test_project_2d_methods_and_errors() -> None:
    x, _, _ = _line_data(100)
    p = project_2d(x, "pca")
    assert p.method == "pca" and p.xy.shape == (100, 2)
    np.testing.assert_allclose(p.xy, pca(x))
    assert project_2d(x, "auto").method == ("umap" if umap_available() else "pca")
    assert project_2d(x[:3], "auto").method == "pca"  # too few points for UMAP
    with pytest.raises(ValueError, match="unknown projection"):
        project_2d(x, "tsne")
    with pytest.raises(ValueError, match=r"\(n, C\)"):
        project_2d(np.zeros((2, 3, 4)), "pca")
    if not umap_available():
        with pytest.raises(ImportError):
            project_2d(x, "umap")


@pytest.mark.skipif(not umap_available(), reason="umap-learn is not installed")
def test_umap_separates_clusters() -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 1, (3, 64))
    x = np.vstack([c + rng.normal(0, 0.05, (60, 64)) for c in centres]).astype(np.float32)
    p = project_2d(x, "umap")
    assert p.method == "umap" and p.xy.shape == (180, 2)
    labels = np.repeat(np.arange(3), 60)
    means = np.stack([p.xy[labels == k].mean(0) for k in range(3)])
    nearest = np.linalg.norm(p.xy[:, None] - means[None], axis=2).argmin(1)
    assert (nearest == labels).mean() > 0.95
