"""Labeling speed, printed as figures and ratios measured in one run.

1. Throughput on N generated 500x375 JPEGs (default 2,000), CPU ONNX Runtime, fresh cache:
   Conv4 at 84 px and EfficientNet-Lite0 at 224 px, each with the fp32 and the int8
   (``LabelSettings.precision``) model, beside the decode+resize-only bound (the same thread
   pool running only ``load_and_preprocess``) measured in the same run; and the CPU time per
   image of decoding, of the network alone and of labeling, which is where the time goes.
   Targets: Conv4 >= 0.7x its bound; Lite0 >= 60 images/s on 2 cores.
2. Relabel after one correction with 10,000 cached 1280-d embeddings (ProtoNet head): <= 50 ms.
3. Peak RSS of a child process labeling 20,000 images (hard links to the generated JPEGs, so
   every one is a distinct path that is decoded and embedded): < 1.5 GB.
4. torch CUDA throughput (Conv4 and Lite0, beside the bound), when CUDA works
   (``--cuda-only``: this alone).

    python benchmarks/label_speed.py [--quick] [--n 2000] [--memory-n 20000]

Random-init weights (speed does not depend on them). Other processes on the machine slow
every figure alike; the ratios are what compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fewshot_studio.data.images import load_and_preprocess  # noqa: E402
from fewshot_studio.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: E402
from fewshot_studio.engine.api import LabelSettings  # noqa: E402
from fewshot_studio.engine.backends import PRECISIONS, OnnxBackend  # noqa: E402
from fewshot_studio.engine.cache import FEATURE_FORMAT, EmbeddingCache, FileKey  # noqa: E402
from fewshot_studio.engine.onnx_export import example_input  # noqa: E402
from fewshot_studio.engine.session import LabelingSession  # noqa: E402
from fewshot_studio.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from fewshot_studio.models import create_backbone, create_method, model_spec  # noqa: E402


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0
               ) -> list[Path]:
    """``n`` photo-like JPEGs (smooth colour fields + texture + noise), 3 'classes'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        c = i % 3
        base = np.zeros((h, w, 3), np.float32)
        base[..., c] = 160
        f = rng.uniform(2, 12)
        tex = 50 * np.sin(xx / w * f * np.pi + rng.uniform(0, 6)) * np.cos(yy / h * f * np.pi)
        a = base + tex[..., None] + rng.normal(0, 12, (h, w, 3)).astype(np.float32) + 40
        p = folder / f"{c}_{i:05d}.jpg"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p, quality=88)
        paths.append(p)
    return paths


def make_checkpoint(path: Path, backbone: str, size: int) -> Path:
    torch.manual_seed(0)
    if backbone == "conv4":
        cfg = {"in_channels": 3, "image_size": size, "hidden": 64}
        method = create_method("protonet", create_backbone("conv4", **cfg))
        pre = Preprocess(size, 3, IMAGENET_MEAN, IMAGENET_STD, "squash")
    else:
        cfg = {"image_size": size}
        method = create_method("protonet", create_backbone(backbone, **cfg), pool="avg")
        pre = Preprocess(size, 3, (0.5,) * 3, (0.5,) * 3, "center_crop")
    ck = Checkpoint(model=model_spec(method, backbone, cfg), preprocess=pre,
                    state_dict=method.state_dict(), name=path.stem)
    return save_checkpoint(path, ck)


def decode_bound(paths: list[Path], pre: Preprocess) -> tuple[float, float]:
    """(images/s, CPU ms per image) of decode + resize + normalise only, with the engine's
    pool size."""
    workers = max(1, min(8, os.cpu_count() or 1))
    t, c = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda p: load_and_preprocess(p, pre), paths, chunksize=16):
            pass
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    return len(paths) / dt, 1000 * cpu / len(paths)


def label_throughput(ckpt: Path, support: dict[str, list[Path]], queries: list[Path],
                     cache: Path, backend: str = "onnxruntime", device: str = "cpu",
                     precision: str = "fp32") -> tuple[float, str]:
    """images/s of a full labeling run over ``queries`` with an empty cache (the backend,
    including its ONNX export and int8 quantisation, is built before the clock starts)."""
    settings = LabelSettings(device=device, precision=precision)
    with LabelingSession(ckpt, settings, cache_path=cache, backend=backend) as s:
        s.set_support(support)
        s.prepare()
        list(s.run(support["a"][:1] + support["b"][:1]))  # warm-up: support embedded
        t, c = time.perf_counter(), time.process_time()
        for _ in s.run(queries):
            pass
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        assert s.counters.embedded >= len(queries)
        CPU_MS[(str(ckpt), precision)] = 1000 * cpu / len(queries)
        return len(queries) / dt, str(s.backend)


def network_cpu_ms(ckpt: Path, cache: Path, n: int = 96) -> dict[str, float]:
    """CPU ms per image of the network alone, fp32 and int8: the session's ONNX files (cached
    beside ``cache`` by the labeling runs) on random preprocessed images, one thread, in the
    engine's micro-batches; best of 3 passes."""
    out = {}
    with LabelingSession(ckpt, LabelSettings(device="cpu"), cache_path=cache,
                         backend="onnxruntime") as s:
        for precision, path in (("fp32", s.onnx_path()), ("int8", s.int8_onnx_path())):
            backend = OnnxBackend(path, input_bytes=4 * s.preprocess.channels
                                  * s.preprocess.image_size ** 2)
            m = backend.micro_batch
            x = example_input(s.preprocess, n).numpy()
            backend.embed(x[:m])
            passes = []
            for _ in range(3):
                c = time.process_time()
                for i in range(0, n - m + 1, m):
                    backend.embed(x[i:i + m])
                passes.append(1000 * (time.process_time() - c) / (n // m * m))
            out[precision] = min(passes)
    return out


CPU_MS: dict[tuple[str, str], float] = {}  # CPU ms per image of the last runs (all threads)


def cached_placeholders(tmp: Path, n: int, d: int, n_way: int, per_class: int = 1,
                        spread: float = 0.8) -> tuple[Path, list[Path], Path]:
    """A tiny checkpoint and ``n + n_way * per_class`` placeholder files under ``tmp`` whose
    ``(d,)`` features (class ``i % n_way``'s centre plus ``spread`` noise) are put in the cache
    through its API, so a session embeds nothing. Returns ``(checkpoint, paths, cache)``: the
    last ``n_way * per_class`` paths are meant as examples, class ``k`` every ``n_way``-th."""
    ckpt = make_checkpoint(tmp / "relabel.safetensors", "conv4", 84)
    folder = tmp / "relabel"
    folder.mkdir()
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (n_way, d)).astype(np.float32)
    paths = []
    for i in range(n + n_way * per_class):
        p = folder / f"{i:05d}.jpg"
        p.write_bytes(b"x")
        paths.append(p)
    cache_path = tmp / "relabel.sqlite"
    with EmbeddingCache(cache_path) as cache:
        model_id = f"{cache.checkpoint_identity(ckpt)}:{FEATURE_FORMAT}"
        rows = [(FileKey.of(p), centres[i % n_way]
                 + rng.normal(0, spread, d).astype(np.float32), "")
                for i, p in enumerate(paths)]
        cache.store(model_id, rows)
    return ckpt, paths, cache_path


def relabel_ms(tmp: Path, n: int = 10_000, d: int = 1280, n_way: int = 5
               ) -> tuple[float, float, float]:
    """Median ms of correct() (wall, and CPU time: the head is single-threaded, so CPU time
    is what it takes on an idle core), and of a threshold change, with ``n`` cached
    ``d``-dim features: placeholder files whose features are put in the cache through its
    API (:func:`cached_placeholders`)."""
    ckpt, paths, cache_path = cached_placeholders(tmp, n, d, n_way)
    support = {f"c{k}": [paths[n + k]] for k in range(n_way)}
    with LabelingSession(ckpt, LabelSettings(), cache_path=cache_path, backend="torch") as s:
        s.set_support(support)
        list(s.run(paths[:n]))
        assert s.counters.embedded == 0 and len(s.predictions()) == n
        times, cpu_times, thr_times = [], [], []
        for j in range(9):
            t, c = time.perf_counter(), time.process_time()
            s.correct([paths[j]], f"c{(j + 1) % n_way}")
            times.append(1000 * (time.perf_counter() - t))
            cpu_times.append(1000 * (time.process_time() - c))
            t = time.perf_counter()
            s.set_settings(LabelSettings(unknown_threshold=0.3 + 0.05 * j))
            thr_times.append(1000 * (time.perf_counter() - t))
        assert s.counters.embedded == 0
    return statistics.median(times), statistics.median(cpu_times), statistics.median(thr_times)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: ``VmHWM`` of /proc/self/status (the
    high-water mark of this program's own memory). Not ``getrusage``'s ``ru_maxrss``: Linux
    carries that over ``execve`` from the forked copy of the parent, so a child started by a
    big parent reports the parent's size (1,410 MB here, against 473 MB measured alone).
    Elsewhere (no /proc) ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kb / 1024
    except (OSError, StopIteration):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS: bytes


def memory_child(ckpt: Path, src: list[Path], n: int, tmp: Path) -> None:
    """Label ``n`` hard links to ``src`` (distinct paths: every one is decoded and embedded)
    and print the process's peak RSS."""
    folder = tmp / "mem"
    folder.mkdir()
    links = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        os.link(src[i % len(src)], p)
        links.append(p)
    support = {"a": src[0:3:3], "b": src[1:4:3], "c": src[2:5:3]}
    t = time.perf_counter()
    with LabelingSession(ckpt, LabelSettings(), cache_path=tmp / "mem.sqlite",
                         backend="onnxruntime") as s:
        s.set_support(support)
        for _ in s.run(links):
            pass
        assert len(s.predictions()) == n
    dt = time.perf_counter() - t
    print(f"PEAK_RSS_MB {peak_rss_mb():.1f} SECONDS {dt:.1f}")


def cuda_throughput(tmp: Path, jpegs: list[Path], support: dict[str, list[Path]]) -> None:
    """torch CUDA labeling throughput of Conv4 84 px and Lite0 224 px beside the
    decode+resize bound measured just before each."""
    from fewshot_studio.engine.backends import torch_cuda_works

    if not torch_cuda_works():
        print("torch CUDA: no working CUDA on this machine (not measured)")
        return
    print(f"GPU: {torch.cuda.get_device_name(0)}; {os.cpu_count()} CPUs decode")
    for name, backbone, size in (("Conv4 84px", "conv4", 84),
                                 ("Lite0 224px", "efficientnet_lite0", 224)):
        ck = make_checkpoint(tmp / f"{backbone}.safetensors", backbone, size)
        bound, _ = decode_bound(jpegs, load_checkpoint(ck).preprocess)
        rate, info = label_throughput(ck, support, jpegs, tmp / f"cuda-{backbone}.sqlite",
                                      "torch", "cuda")
        print(f"{name:12s} torch CUDA labeling {rate:7.1f} img/s | decode+resize bound "
              f"{bound:7.1f} img/s | ratio {rate / bound:.2f} | {info}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="JPEGs for the throughput runs")
    ap.add_argument("--memory-n", type=int, default=20_000, help="images for the RSS run")
    ap.add_argument("--quick", action="store_true", help="n=300, memory-n=2000")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--cuda-only", action="store_true",
                    help="only torch CUDA throughput (Conv4 and Lite0) beside the "
                         "decode+resize bound (a GPU machine's short check)")
    ap.add_argument("--memory-child", nargs=3, metavar=("CKPT", "SRC_DIR", "N"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        ck, src_dir, n = args.memory_child
        with tempfile.TemporaryDirectory() as d:
            memory_child(Path(ck), sorted(Path(src_dir).glob("*.jpg")), int(n), Path(d))
        return
    if args.quick:
        args.n, args.memory_n = 300, 2000
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = time.perf_counter()
        jpegs = make_jpegs(tmp / "jpegs", args.n)
        print(f"generated {len(jpegs)} 500x375 JPEGs in {time.perf_counter() - t:.1f} s")
        support_imgs = make_jpegs(tmp / "support", 9, seed=1)
        support = {"a": support_imgs[0::3], "b": support_imgs[1::3], "c": support_imgs[2::3]}
        if args.cuda_only:
            cuda_throughput(tmp, jpegs, support)
            return
        results: dict[tuple[str, str], tuple[float, float]] = {}
        cores = os.cpu_count() or 1
        for name, backbone, size in (("Conv4 84px", "conv4", 84),
                                     ("Lite0 224px", "efficientnet_lite0", 224)):
            ck = make_checkpoint(tmp / f"{backbone}.safetensors", backbone, size)
            pre = load_checkpoint(ck).preprocess
            bound_cpu = {}
            for precision in PRECISIONS:  # the bound just before each run: the load varies
                bound, bound_cpu[precision] = decode_bound(jpegs, pre)
                rate, info = label_throughput(ck, support, jpegs,
                                              tmp / f"{backbone}-{precision}.sqlite",
                                              precision=precision)
                results[(name, precision)] = (rate, bound)
                print(f"{name:12s} {precision} labeling {rate:7.1f} img/s | decode+resize bound "
                      f"{bound:7.1f} img/s | ratio {rate / bound:.2f} | {info}")
            net = network_cpu_ms(ck, tmp / f"{backbone}-fp32.sqlite")
            cpu_ms = {p: CPU_MS[(str(ck), p)] for p in PRECISIONS}
            print(f"{'':12s} CPU ms per image (fp32, int8): decode+resize "
                  + ", ".join(f"{bound_cpu[p]:.2f}" for p in PRECISIONS)
                  + "; network alone (1 thread) " + ", ".join(f"{net[p]:.2f}" for p in PRECISIONS)
                  + "; labeling " + ", ".join(f"{cpu_ms[p]:.2f}" for p in PRECISIONS))
            print(f"{'':12s} on {cores} idle cores: "
                  + ", ".join(f"{p} {1000 * cores / cpu_ms[p]:.0f} img/s, bound "
                              f"{1000 * cores / bound_cpu[p]:.0f} (ratio "
                              f"{bound_cpu[p] / cpu_ms[p]:.2f})" for p in PRECISIONS))
        for p in PRECISIONS:
            c_rate, c_bound = results[("Conv4 84px", p)]
            l_rate, _ = results[("Lite0 224px", p)]
            print(f"target Conv4 >= 0.7x bound, {p}: {c_rate / c_bound:.2f}x "
                  f"{'PASS' if c_rate >= 0.7 * c_bound else 'MISS'}; "
                  f"target Lite0 >= 60 img/s, {p}: {l_rate:.1f} "
                  f"{'PASS' if l_rate >= 60 else 'MISS'}")
        cuda_throughput(tmp, jpegs, support)
        corr_ms, corr_cpu, thr_ms = relabel_ms(tmp)
        print(f"relabel after one correction, 10,000 cached 1280-d embeddings: {corr_ms:.1f} ms "
              f"wall, {corr_cpu:.1f} ms CPU (median of 9; threshold change {thr_ms:.1f} ms) "
              f"{'PASS' if corr_ms <= 50 else 'MISS'} (target <= 50 ms)")
        if not args.skip_memory:
            ck = tmp / "conv4.safetensors"
            cmd = [sys.executable, __file__, "--memory-child", str(ck), str(tmp / "jpegs"),
                   str(args.memory_n)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            line = next(x for x in out.splitlines() if x.startswith("PEAK_RSS_MB"))
            peak, secs = float(line.split()[1]), float(line.split()[3])
            print(f"peak RSS labeling {args.memory_n} images (Conv4 84px, ONNX Runtime, child "
                  f"process): {peak:.0f} MB in {secs:.0f} s "
                  f"({args.memory_n / secs:.0f} img/s) "
                  f"{'PASS' if peak < 1536 else 'MISS'} (target < 1.5 GB)")


if __name__ == "__main__":
    main()
