"""Data-parallel training on 2 CPU processes (gloo) agrees with one process;
through the CLI also on 2 GPUs (NCCL) where a machine has them.

Tolerances: without BatchNorm, two processes each taking half of every global
batch produce the same averaged gradients as one process, so the SRM stages must
match a single-process run to float32 round-off (atol 1e-5). Through the CLI the
models have BatchNorm (per-process batch statistics) and per-process augmentation,
so there the check is that the run completes, writes one set of outputs, and
lands within 0.2 test accuracy of a single-process run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import SimulatedRankZero, child_env
from srm_ext import SRMDistiller
from srm_ext.distill import DistributedContext, StageConfig, Trainer, accuracy
from srm_ext.distill.methods import cross_entropy_stage
from srm_ext.distill.data import DatasetSplits, make_loaders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conv_net(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 1
    for i, cout in enumerate(widths):
        layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 3))


def toy_splits() -> DatasetSplits:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (64,), generator=g)
    data = TensorDataset(images, labels)
    return DatasetSplits(data, data, 3, 1, 8, (0.5,), (0.25,), natural_images=False)


def train_srm(
    context: DistributedContext, checkpoint: Path, student_seed: int | None = None
) -> dict[str, torch.Tensor]:
    """All three SRM stages, checkpointed to ``checkpoint``; returns the
    student's and the blocks' final weights. ``student_seed`` reseeds torch
    before the student and the SRM blocks are built."""
    torch.manual_seed(0)
    teacher = conv_net((6, 8))
    if student_seed is not None:
        torch.manual_seed(student_seed)
    student = conv_net((4, 5))
    distiller = SRMDistiller(teacher, student, {"1": "1", "3": "3"}, input_shape=(1, 8, 8))
    loader, _ = make_loaders(toy_splits(), batch_size=16, seed=5, context=context)
    trainer = Trainer(
        preprocess=lambda x, train: x.float() / 255, progress=False, context=context, log=None
    )
    config = StageConfig(epochs=2)
    distiller.fit_dictionaries(loader, config=config, trainer=trainer, checkpoint=checkpoint)
    distiller.fit_student(loader, config=config, trainer=trainer, checkpoint=checkpoint)
    distiller.fit_kd(loader, config=config, trainer=trainer, checkpoint=checkpoint)
    return {
        **{f"student.{k}": v for k, v in distiller.student.state_dict().items()},
        **{f"rep.{k}": v for k, v in distiller.representations.state_dict().items()},
        **{f"pred.{k}": v for k, v in distiller.predictors.state_dict().items()},
    }


def _worker(rank: int, world_size: int, port: int, out: str, seed_per_rank: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        weights = train_srm(
            DistributedContext.current(),
            Path(f"{out}.checkpoint.pt"),
            student_seed=rank if seed_per_rank else None,
        )
        torch.save(weights, f"{out}.{rank}")
        # Both ranks done before either tears its gloo pairs down.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "w")), nprocs=2, join=True)
    single = train_srm(DistributedContext(), tmp_path / "single.pt")
    # One checkpoint, written by rank 0, with both processes' RNG states.
    checkpoint = torch.load(tmp_path / "w.checkpoint.pt", weights_only=True)
    assert len(checkpoint["rng"]) == 2
    assert [s["training"]["epoch"] for s in checkpoint["stages"].values()] == [2, 2, 2]
    rank0 = torch.load(tmp_path / "w.0", weights_only=True)
    rank1 = torch.load(tmp_path / "w.1", weights_only=True)
    assert rank0.keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # replicas agree
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_replicas_seeded_per_rank_train_rank_0s_model(tmp_path):
    # A script seeding torch with its rank builds another student and other
    # SRM blocks on each process; every stage starts from rank 0's.
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "w"), True), nprocs=2, join=True)
    single = train_srm(DistributedContext(), tmp_path / "single.pt", student_seed=0)
    rank0 = torch.load(tmp_path / "w.0", weights_only=True)
    rank1 = torch.load(tmp_path / "w.1", weights_only=True)
    for key, value in single.items():
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=key)


def held_out_splits() -> DatasetSplits:
    """37 samples, so that two processes' shards are 19 and 18."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8, generator=g)
    data = TensorDataset(images, torch.randint(0, 3, (37,), generator=g))
    return DatasetSplits(data, data, 3, 1, 8, (0.5,), (0.25,), natural_images=False)


def held_out_accuracy(context: DistributedContext) -> float:
    """A fixed model on the held-out samples, each process taking its shard."""
    torch.manual_seed(0)
    model = conv_net((4, 5))
    _, test = make_loaders(held_out_splits(), batch_size=8, seed=0, context=context)
    trainer = Trainer(preprocess=lambda x, train: x.float() / 255, progress=False,
                      context=context, log=None)
    return accuracy(model, test, trainer, context=context)


def _accuracy_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        Path(f"{out}.{rank}").write_text(repr(held_out_accuracy(DistributedContext.current())))
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_sums_to_the_single_process_accuracy(tmp_path):
    mp.spawn(_accuracy_worker, args=(2, free_port(), str(tmp_path / "acc")), nprocs=2, join=True)
    single = held_out_accuracy(DistributedContext())
    assert 0.0 < single < 1.0  # a mixed result, so a half-set count would show
    for rank in (0, 1):
        assert float((tmp_path / f"acc.{rank}").read_text()) == single


def _image_check_worker(rank: int, world_size: int, port: int, tree: str, out: str) -> None:
    from srm_ext.distill import ConfigError
    from srm_ext.distill.data import load_imagefolder
    from srm_ext.distill.image_check import check_images

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        splits = load_imagefolder(Path(tree), 4, skip_unreadable=True)
        try:
            check_images(splits, context=DistributedContext.current())
            Path(f"{out}.{rank}").write_text("read")
        except ConfigError as exc:
            Path(f"{out}.{rank}").write_text(str(exc))
    finally:
        dist.destroy_process_group()


def test_check_images_reads_on_the_main_process_and_every_process_stops(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4)).save(tmp_path / "tree" / name / f"{i}.png")
    (tmp_path / "tree" / "b" / "2.png").write_bytes(b"not an image")
    mp.spawn(_image_check_worker, args=(2, free_port(), str(tmp_path / "tree"), str(tmp_path / "r")),
             nprocs=2, join=True)
    assert (tmp_path / "r.0").read_text().startswith("1 image(s) cannot be read: ")
    assert (tmp_path / "r.1").read_text() == "1 image(s) cannot be read (the main process lists them)"


def _kd_eval_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """Stage 3 with a sharded held-out loader: writes the accuracy the stage
    logged and the trained student's accuracy on the whole held-out set."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        context = DistributedContext.current()
        torch.manual_seed(0)
        distiller = SRMDistiller(conv_net((6, 8)), conv_net((4, 5)), {"1": "1"}, input_shape=(1, 8, 8))
        loader, _ = make_loaders(toy_splits(), batch_size=16, seed=5, context=context)
        _, shard = make_loaders(held_out_splits(), batch_size=8, seed=0, context=context)
        _, whole = make_loaders(held_out_splits(), batch_size=8, seed=0)
        trainer = Trainer(
            preprocess=lambda x, train: x.float() / 255, progress=False, context=context, log=None
        )
        history = distiller.fit_kd(loader, config=StageConfig(epochs=1), eval_loader=shard, trainer=trainer)
        local = Trainer(preprocess=trainer.preprocess, progress=False, log=None)
        logged, full = history[-1]["test_acc"], accuracy(distiller.student, whole, local)
        Path(f"{out}.{rank}").write_text(json.dumps([logged, full]))
    finally:
        dist.destroy_process_group()


def test_stage3_accuracy_counts_every_processs_held_out_shard(tmp_path):
    mp.spawn(_kd_eval_worker, args=(2, free_port(), str(tmp_path / "kd")), nprocs=2, join=True)
    for rank in (0, 1):
        logged, full = json.loads((tmp_path / f"kd.{rank}").read_text())
        assert 0.0 < full < 1.0  # a mixed result, so one shard's count would show
        assert logged == full, rank


def train_accumulated(context: DistributedContext) -> dict[str, torch.Tensor]:
    """Two epochs of 5 batches of 12, 2 batches a step (the last group is one
    batch), every step clipped (the gradient norms are 0.06-0.2)."""
    torch.manual_seed(0)
    model = conv_net((4, 5))
    loader, _ = make_loaders(toy_splits(), batch_size=12, seed=5, context=context)
    trainer = Trainer(preprocess=lambda x, train: x.float() / 255, progress=False,
                      context=context, log=None, accumulate_steps=2, max_grad_norm=0.05)
    trainer.fit(cross_entropy_stage("ce", model, StageConfig(epochs=2)), loader)
    return model.state_dict()


def _accumulation_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.save(train_accumulated(DistributedContext.current()), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_accumulated_and_clipped_steps_match_one_process(tmp_path):
    # The clip sees the averaged gradients: clipping each process's own
    # (half-batch) gradients would take other steps.
    mp.spawn(_accumulation_worker, args=(2, free_port(), str(tmp_path / "w")), nprocs=2, join=True)
    single = train_accumulated(DistributedContext())
    rank0 = torch.load(tmp_path / "w.0", weights_only=True)
    rank1 = torch.load(tmp_path / "w.1", weights_only=True)
    for key, value in single.items():
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=key)


class PeerOverflowed(SimulatedRankZero):
    """Rank 0 of two whose peer's scaled gradients overflowed: the all-reduce
    brings in an inf, the rest is local."""

    def all_reduce_gradients(self, parameters):
        for p in parameters:
            if p.grad is not None:
                p.grad.add_(float("inf")).div_(self.world_size)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")  # the skipped step
def test_fp16_step_is_skipped_when_any_process_overflowed(monkeypatch):
    # The GradScaler's inf check must see the reduced gradients: one that saw
    # only this process's would step on the peer's inf and leave NaN weights.
    monkeypatch.setattr(Trainer, "_grad_scaler", lambda self: torch.amp.GradScaler("cpu"))
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), batch_size=4)
    trainer = Trainer(progress=False, log=None, context=PeerOverflowed(rank=0, world_size=2))
    [metrics] = trainer.fit(cross_entropy_stage("ce", model, StageConfig(epochs=1)), loader)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert metrics["grad_norm"] is None  # no step was taken


@pytest.mark.parametrize("device", [
    "cpu",  # gloo
    pytest.param("cuda", marks=pytest.mark.skipif(  # NCCL, one GPU per process
        torch.cuda.device_count() < 2, reason="needs two GPUs")),
])
def test_torchrun_cli_two_processes(tmp_path, device):
    flags = [
        "distill", "--preset", "quick", "--train-limit", "128", "--test-limit", "64",
        "--batch-size", "32", "--teacher-width", "0.34", "--student-width", "0.05",
        "--epochs-teacher", "2", "--epochs-dictionary", "1", "--epochs-init", "1",
        "--epochs-student", "2", "--methods", "kd,srm", "--threads", "1", "--quiet",
        "--device", device,
    ]
    env = child_env()
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "srm_ext", *flags, "--output-dir", str(ddp_out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| srm |") == 1  # the table is printed by rank 0 only
    proc = subprocess.run(
        [sys.executable, "-m", "srm_ext", *flags, "--output-dir", str(single_out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def load(out: Path) -> tuple[dict, list]:
        runs = {r["run"]: r["test_acc"] for r in json.loads((out / "results.json").read_text())["runs"]}
        records = (out / "metrics.jsonl").read_text().splitlines()
        return runs, records

    ddp_runs, ddp_records = load(ddp_out)
    single_runs, single_records = load(single_out)
    assert ddp_runs.keys() == single_runs.keys()
    assert len(ddp_records) == len(single_records)  # one writer, no duplicated epochs
    for run, acc in single_runs.items():
        assert abs(ddp_runs[run] - acc) <= 0.2, (run, ddp_runs[run], acc)


@pytest.mark.parametrize("cores, world_size, threads", [(16, 1, 8), (16, 2, 4), (2, 1, 1), (1, 1, 1), (4, 8, 1)])
def test_default_cpu_threads_is_half_the_cores_per_process(monkeypatch, cores, world_size, threads):
    from srm_ext.distill import experiment
    from srm_ext.distill.experiment import default_cpu_threads

    monkeypatch.setattr(experiment, "available_cpu_cores", lambda: cores)
    assert default_cpu_threads(DistributedContext(rank=0, world_size=world_size)) == threads


def test_auto_device_is_the_local_ranks_gpu_else_the_cpu():
    from srm_ext.distill.distributed import resolve_device

    second_rank = DistributedContext(rank=1, world_size=2, local_rank=1)
    if torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cuda", 0)
        assert resolve_device("cuda", second_rank) == torch.device("cuda", 1)
    else:
        assert resolve_device("auto", second_rank) == torch.device("cpu")
        with pytest.raises(ValueError, match="'cuda' requested but CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("gpus, message", [
    (0, "device 'cuda' requested but CUDA is not available"),
    (1, "process 1 of this node has no GPU of its own: the node has 1; start at most that many"),
])
def test_a_torchrun_process_without_a_gpu_is_refused_before_joining(monkeypatch, gpus, message):
    # Joining an NCCL group first needs the process's GPU: say why there is none.
    from srm_ext.distill import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match=message):
        distributed.init_distributed("cuda")
