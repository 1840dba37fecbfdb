"""Data-parallel training: 2 CPU processes with gloo on a tiny generated dataset. One
checkpoint set is written (rank 0), and the ranks' parameters stay identical.

The workers meet through a file store (``file://``), not a TCP port: a port picked free
beforehand can be taken by another process before rank 0 binds it (a flaky test). The trainer
joins the process group it finds, as under torchrun."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fixtures_train import make_glyphs
from safetensors.torch import load_file, save_file

from fewshot_studio.io.checkpoint import load_checkpoint
from fewshot_studio.training.config import TrainConfig
from fewshot_studio.training.trainer import TrainResult, load_train_state, train

WORLD = 2


def _worker(rank: int, store: str, data: str, out: str, report: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    try:
        _train_and_report(rank, data, out, report)
        dist.barrier()  # both reports written before either rank leaves the group
    finally:
        dist.destroy_process_group()


def _train_and_report(rank: int, data: str, out: str, report: str) -> None:
    cfg = TrainConfig(data=(data,), way=4, shot=1, query=3, episodes=6, val_every=3,
                      val_episodes=5, val_way=3, val_fraction=0.3, out=out, log_every=2,
                      backbone_kwargs={"hidden": 16}, device="cpu", seed=0)
    result = None
    for p in train(cfg):
        if isinstance(p.payload, TrainResult):
            result = p.payload
    assert result is not None and result.step == 6
    params = {k: v.detach().contiguous() for k, v in result.model.named_parameters()}
    save_file(params, str(Path(report) / f"rank{rank}.safetensors"))


def test_two_process_gloo_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_glyphs(data, n_classes=10, n_per_class=8, seed=2)
    out, report = tmp_path / "run", tmp_path / "report"
    report.mkdir()
    store = tmp_path / "store"  # created by the process group; must not exist yet
    mp.spawn(_worker, args=(str(store), str(data), str(out), str(report)), nprocs=WORLD,
             join=True)

    written = sorted(p.name for p in out.iterdir())
    assert written == ["best.safetensors", "last.safetensors", "metrics.csv",
                       "resume.safetensors"]
    ckpt = load_checkpoint(out / "last.safetensors")
    assert ckpt.training["world_size"] == WORLD and ckpt.training["step"] == 6
    _, meta = load_train_state(out / "resume.safetensors")
    assert len(meta["sampler_states"]) == WORLD
    assert meta["sampler_states"][0] != meta["sampler_states"][1]  # own episodes per rank

    r0 = load_file(str(report / "rank0.safetensors"))
    r1 = load_file(str(report / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], ckpt.state_dict[k]), k
    # and they did train: the weights moved away from the seeded initialisation
    torch.manual_seed(0)
    from fewshot_studio.training.trainer import build_model

    init, _ = build_model(TrainConfig(backbone_kwargs={"hidden": 16}))
    moved = [k for k, v in init.named_parameters() if not torch.equal(v.detach(), r0[k])]
    assert moved
