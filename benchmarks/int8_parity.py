"""int8 vs fp32 embedding (ONNX Runtime, CPU) on a real checkpoint: accuracy on the same fixed
episodes, how often the two agree, and how far the features move.

The int8 model is built exactly as the labeling engine builds it for ``--precision int8``
(:func:`~fewshot_studio.engine.onnx_export.quantize_embed_onnx` calibrated on
:func:`~fewshot_studio.engine.onnx_export.synthetic_calibration`).

    python benchmarks/int8_parity.py --checkpoint omniglot-protonet \\
        --data ../shared/data/omniglot/images_evaluation.zip
    python benchmarks/int8_parity.py --checkpoint natural-protonet \\
        --data ../shared/data/caltech101/caltech101.zip \\
        --classes resources/splits/caltech101_test.txt --protocols 5w1s 5w5s
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fewshot_studio.data.images import normalize_uint8  # noqa: E402
from fewshot_studio.engine import onnx_export as X  # noqa: E402
from fewshot_studio.io.checkpoint import load_checkpoint  # noqa: E402
from fewshot_studio.paths import resolve_checkpoint  # noqa: E402
from fewshot_studio.training.evaluate import confidence_interval, fixed_episodes  # noqa: E402
from fewshot_studio.training.train_data import load_eval_images  # noqa: E402


def embed(path: Path, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """``(N, C, H, W)`` preprocessed float32 images -> ``(N, *feature_shape)`` features."""
    sess = X.onnx_session(path)
    return np.concatenate([sess.run(None, {X.INPUT_NAME: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--classes", default=None)
    ap.add_argument("--protocols", nargs="+", default=["5w1s", "20w1s", "20w5s"])
    ap.add_argument("--episodes", type=int, default=1000)
    args = ap.parse_args()
    ckpt = load_checkpoint(resolve_checkpoint(args.checkpoint))
    pre, model = ckpt.preprocess, ckpt.build("cpu").eval()
    images = load_eval_images([args.data], pre, args.classes)
    x = normalize_uint8(images.images.numpy(), pre)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = X.export_embed_onnx(model, pre, Path(tmp) / "fp32.onnx")
        t = time.perf_counter()
        int8 = X.quantize_embed_onnx(fp32, Path(tmp) / "int8.onnx", X.synthetic_calibration(pre))
        quant_s = time.perf_counter() - t
        feats = {"fp32": embed(fp32, x), "int8": embed(int8, x)}
    a, b = (f.reshape(len(f), -1) for f in (feats["fp32"], feats["int8"]))
    rel = np.linalg.norm(b - a, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    print(f"{ckpt.name}: {len(x)} images; quantised in {quant_s:.1f} s; int8 feature error "
          f"|f8 - f32| / |f32|: median {np.median(rel):.4f}, p99 {np.quantile(rel, 0.99):.4f}")
    for proto in args.protocols:
        way, shot = (int(v) for v in proto.rstrip("s").split("w"))
        eps, _ = fixed_episodes(images, way, shot, None, args.episodes, 0)
        acc: dict[str, list[float]] = {k: [] for k in feats}
        same = total = 0
        for ep in eps:
            preds = {}
            for k, f in feats.items():
                ft = torch.from_numpy(f)
                with torch.enable_grad() if getattr(model, "fit_needs_grad", False) \
                        else torch.no_grad():
                    logits = model.fit(ft[ep.support], ep.support_labels, way)(ft[ep.query])
                preds[k] = logits.detach().argmax(-1)
                acc[k].append(float((preds[k] == ep.query_labels).float().mean()))
            same += int((preds["int8"] == preds["fp32"]).sum())
            total += len(ep.query)
        (m32, c32), (m8, c8) = confidence_interval(acc["fp32"]), confidence_interval(acc["int8"])
        diff = np.asarray(acc["int8"]) - np.asarray(acc["fp32"])
        dm, dc = confidence_interval(diff.tolist())
        print(f"{proto} ({args.episodes} episodes, seed 0): fp32 {100 * m32:.2f} +- {100 * c32:.2f}"
              f" | int8 {100 * m8:.2f} +- {100 * c8:.2f} | int8 - fp32 {100 * dm:+.2f} +- "
              f"{100 * dc:.2f} points | same prediction {100 * same / total:.2f}%")


if __name__ == "__main__":
    main()
