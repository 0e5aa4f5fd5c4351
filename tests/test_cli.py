"""The ``srm-ext`` command line: smoke runs, output directory, resume
equivalence and one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo.config as dynamo_config
from torch import nn
from torch.utils.data import DataLoader

from conftest import child_env
from srm_ext.cli import build_config, build_parser, main
from srm_ext.distill import (
    ConfigError,
    ExperimentConfig,
    ExperimentRunner,
    accuracy,
    load_trained_model,
    trained_model_names,
)
from srm_ext.distill import experiment
from srm_ext.distill.config import error_line
from srm_ext.distill.data import load_dataset
from srm_ext.distill.data_fingerprint import dataset_fingerprint
from srm_ext.distill.models import build_model


# A whole experiment in a few seconds: 128 digits, tiny models, 1-2 epochs per stage.
TINY_FLAGS = [
    "--train-limit", "128", "--test-limit", "64", "--batch-size", "32",
    "--teacher-width", "0.34", "--student-width", "0.05",
    "--epochs-teacher", "2", "--epochs-dictionary", "1", "--epochs-init", "2",
    "--epochs-student", "2", "--threads", "1", "--quiet",
    # The runs compare bitwise (resume, seeds): CPU kernels are deterministic,
    # cuDNN and atomics on a GPU are not.
    "--device", "cpu",
]
TINY_CONFIG = dict(
    train_limit=128, test_limit=64, batch_size=32, teacher_width=0.34, student_width=0.05,
    epochs_teacher=2, epochs_dictionary=1, epochs_init=2, epochs_student=2, threads=1,
    quiet=True, seeds=[0], methods=["scratch", "srm"], device="cpu",  # as TINY_FLAGS
)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The runner also sets the thread count; the fixture restores it."""


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "srm_ext", *args], cwd=cwd, env=child_env(),
        capture_output=True, text=True, timeout=300,
    )


def test_distill_quick_preset_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("distill", "--preset", "quick", *TINY_FLAGS, "--output-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| srm |" in proc.stdout and "| kd |" in proc.stdout and "| teacher |" in proc.stdout
    for name in ("config.json", "metrics.jsonl", "results.json", "results.md",
                 "loss_curves.png", "accuracy.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "quick" and config["seeds"] == [0] and config["train_limit"] == 128
    resolved = config["resolved"]  # what "auto" and the defaults turned into
    assert resolved["device"] == "cpu" and resolved["threads"] == 1 and resolved["processes"] == 1
    assert resolved["layer_pairs"] and all(":" in pair for pair in resolved["layer_pairs"])
    assert resolved["image_size"] == 8 and resolved["class_names"] == list("0123456789")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in records}
    assert {"teacher", "scratch", "kd", "srm-dictionary", "srm-init", "srm-kd"} <= stages
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["teacher", "scratch", "kd", "srm"]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["current"] is None and len(checkpoint["finished"]) == 4
    student = torch.load(out / "models" / "srm-seed0.pt", weights_only=True)
    assert not any("dictionary" in key for key in student)
    # with the module versions load_state_dict reads (BatchNorm's among them)
    assert student._metadata == load_trained_model(out, "srm-seed0")[1].state_dict()._metadata
    assert any(meta.get("version") == 2 for meta in student._metadata.values())
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # Every model the run wrote, loaded for inference, scores what the run reported.
    assert trained_model_names(out) == ["kd-seed0", "scratch-seed0", "srm-seed0", "teacher"]
    held_out = load_dataset(ExperimentConfig.from_dict(config)).test
    loader = DataLoader(held_out, batch_size=32)
    for run in results["runs"]:
        model = load_trained_model(out, run["run"])
        assert not model.training
        assert accuracy(model, loader) == run["test_acc"], run["run"]


def test_load_trained_model_names_what_is_missing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="has no trained model 'srm-seed0'; it has: none"):
        load_trained_model(out, "srm/seed0")
    (out / "models").mkdir(parents=True)
    torch.save({}, out / "models" / "teacher.pt")
    with pytest.raises(ConfigError, match="holds no run: .*config.json is missing"):
        load_trained_model(out, "teacher")
    # A run stopped before its data loaded wrote the settings without "resolved".
    (out / "config.json").write_text(json.dumps(ExperimentConfig().to_dict()))
    with pytest.raises(ConfigError, match="does not record the model's input"):
        load_trained_model(out, "teacher")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_distill_on_cuda_with_bf16_autocast(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("distill", "--preset", "quick", *TINY_FLAGS, "--device", "cuda", "--amp", "bf16",
                   "--output-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # what "cuda" resolved to: the GPU of the (single) process's local rank
    assert json.loads((out / "config.json").read_text())["resolved"]["device"] == "cuda:0"
    results = json.loads((out / "results.json").read_text())
    assert all(0.0 <= run["test_acc"] <= 1.0 for run in results["runs"])


def test_info_prints_backend_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__


class Interrupt(Exception):
    pass


def _final_numbers(out: Path) -> tuple[list, list]:
    results = json.loads((out / "results.json").read_text())
    accs = [(r["run"], r["test_acc"]) for r in results["runs"]]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [
        {k: v for k, v in r.items() if k != "time"} for r in records
    ]
    return accs, losses


@pytest.mark.parametrize("stop_after", [1, 6])  # inside the teacher; inside SRM stage 2
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, stop_after):
    straight = tmp_path / "straight"
    ExperimentRunner(ExperimentConfig(**TINY_CONFIG, output_dir=str(straight)), log=lambda *_: None).run()

    interrupted = tmp_path / "interrupted"
    seen = []

    def stop(record):
        seen.append(record)
        if len(seen) == stop_after:
            raise Interrupt

    config = ExperimentConfig(**TINY_CONFIG, output_dir=str(interrupted))
    with pytest.raises(Interrupt):
        ExperimentRunner(config, on_epoch_end=stop, log=lambda *_: None).run()
    saved = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert len(saved["history"]) == stop_after  # nothing finished was lost
    assert not (interrupted / "results.json").exists()

    # resume from the CLI, with only the output directory given
    assert main(["distill", "--resume", "--quiet", "--output-dir", str(interrupted)]) == 0
    assert _final_numbers(interrupted) == _final_numbers(straight)
    # The training time adds up the epochs of both invocations.
    results = json.loads((interrupted / "results.json").read_text())
    records = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert results["training_time_s"] == pytest.approx(sum(r["time"] for r in records))
    assert results["training_time_s"] > sum(r["time"] for r in records[stop_after:])


def test_resume_before_the_first_checkpoint_keeps_the_run_settings(tmp_path):
    # Stopped inside its first epoch, a run has config.json but no checkpoint:
    # --resume must start that run again, not one with the default settings.
    out = tmp_path / "run"
    config = ExperimentConfig(**{**TINY_CONFIG, "seeds": [3], "methods": ["scratch"]},
                              output_dir=str(out))
    with pytest.raises(Interrupt):
        ExperimentRunner(config, on_epoch_end=_raise(Interrupt), log=lambda *_: None).run()
    (out / "checkpoint.pt").unlink()
    assert main(["distill", "--resume", "--quiet", "--output-dir", str(out)]) == 0
    runs = [r["run"] for r in json.loads((out / "results.json").read_text())["runs"]]
    assert runs == ["teacher", "scratch/seed3"]
    assert json.loads((out / "config.json").read_text())["train_limit"] == 128


_TREE_SETTINGS = dict(**{**TINY_CONFIG, "methods": ["scratch"], "batch_size": 16},
                      dataset="imagefolder", image_size=8)


def _interrupted_image_tree_run(tree: Path, out: Path) -> ExperimentConfig:
    """A run on a small image tree written at ``tree``, stopped after its first epoch."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "owl"):
        (tree / name).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tree / name / f"{i}.png")
    config = ExperimentConfig(**_TREE_SETTINGS, data_path=str(tree), output_dir=str(out))
    with pytest.raises(Interrupt):
        ExperimentRunner(config, on_epoch_end=_raise(Interrupt), log=lambda *_: None).run()
    return config


def test_resume_goes_on_with_an_image_tree_moved_elsewhere(tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted_image_tree_run(tmp_path / "here", out)
    straight = tmp_path / "straight"
    ExperimentRunner(ExperimentConfig(**_TREE_SETTINGS, data_path=str(tmp_path / "here"),
                                      output_dir=str(straight)), log=lambda *_: None).run()

    (tmp_path / "here").rename(tmp_path / "there")  # mv keeps the modification times
    assert main(["distill", "--resume", "--quiet", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"srm-ext: error: data path {str(tmp_path / 'here')!r} does not exist; if the data "
        "moved, resume with --data-path naming its new place\n"
    )
    # --check-images reads the data before training: it changes nothing a resume compares.
    assert main(["distill", "--resume", "--quiet", "--output-dir", str(out),
                 "--data-path", str(tmp_path / "there"), "--check-images"]) == 0
    assert _final_numbers(out) == _final_numbers(straight)
    assert json.loads((out / "config.json").read_text())["data_path"] == str(tmp_path / "there")


def test_check_images_refuses_a_tree_with_unreadable_images_before_any_output(tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted_image_tree_run(tmp_path / "tree", out)
    bad = [tmp_path / "tree" / "owl" / f"{i}.png" for i in (3, 9)]
    for path in bad:
        path.write_bytes(b"not an image")
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    flags = ["distill", *TINY_FLAGS, "--dataset", "imagefolder", "--image-size", "8",
             "--data-path", str(tmp_path / "tree"), "--check-images", "--output-dir", str(out)]
    assert main([*flags, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("srm-ext: error: 2 image(s) cannot be read: ") and err.count("\n") == 1
    assert all(f"{str(path)!r}: not a readable image" in err for path in bad)
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_resume_reads_the_dataset_fingerprint_of_an_earlier_format(tmp_path, capsys):
    # It named an image tree's files by their full paths, and had no "format".
    out = tmp_path / "run"
    config = _interrupted_image_tree_run(tmp_path / "tree", out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["dataset"]["format"] == 2
    state["dataset"] = dataset_fingerprint(load_dataset(config), full_paths=True)
    torch.save(state, out / "checkpoint.pt")
    resume = ["distill", "--resume", "--quiet", "--output-dir", str(out)]
    # Changed data is still refused; the data at another path too, which that
    # fingerprint cannot tell from other data.
    image = tmp_path / "tree" / "owl" / "5.png"
    original, stat = image.read_bytes(), image.stat()
    image.write_bytes(original + b"\0")
    assert main(resume) == 2
    assert "the dataset differs from the one the run started with" in capsys.readouterr().err
    image.write_bytes(original)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.copytree(tmp_path / "tree", tmp_path / "copy", copy_function=shutil.copy2)
    assert main([*resume, "--data-path", str(tmp_path / "copy")]) == 2
    assert "settings differ from the checkpoint: data_path=" in capsys.readouterr().err
    assert main(resume) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["dataset"]["format"] == 2


def _digit_images(count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (count, 8, 8), dtype=np.uint8),
            "labels": np.arange(count) % 10}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda arrays: arrays["images"][7].fill(0), "the train split's images or labels changed"),
        # A label moves images between the stratified splits.
        (lambda arrays: arrays["labels"].__setitem__(3, 9),
         "the train split's images or labels changed; the test split's images or labels changed"),
        (lambda arrays: arrays.update(_digit_images(150, seed=0)),
         "the train split has 120 images (checkpoint: 128); the test split has 30 images "
         "(checkpoint: 40)"),
    ],
    ids=["pixels", "label", "fewer images"],
)
def test_resume_refuses_a_dataset_changed_since_the_run_started(tmp_path, capsys, change, message):
    data = tmp_path / "data.npz"
    arrays = _digit_images(200, seed=0)
    np.savez(data, **arrays)
    out = tmp_path / "run"
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, dataset="npz",
                              data_path=str(data), output_dir=str(out))
    with pytest.raises(Interrupt):
        ExperimentRunner(config, on_epoch_end=_raise(Interrupt), log=lambda *_: None).run()
    checkpoint = (out / "checkpoint.pt").read_bytes()

    change(arrays)
    np.savez(data, **arrays)
    assert main(["distill", "--resume", "--quiet", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"srm-ext: error: cannot resume {out}: the dataset differs from the one "
                          f"the run started with: {message}. Restore that data")
    assert err.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == checkpoint  # the run is left as it was

    np.savez(data, **_digit_images(200, seed=0))  # the data the run started with
    assert main(["distill", "--resume", "--quiet", "--output-dir", str(out)]) == 0
    assert (out / "results.json").exists()


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("checkpoint.pt", lambda path: torch.save({"a": 1}, path), "is not a checkpoint written by"),
        ("checkpoint.pt", lambda path: torch.save([1, 2], path), "is not a checkpoint written by"),
        ("config.json", lambda path: path.write_text("[1, 2]"), "is malformed: the run config must be"),
        ("config.json", lambda path: path.write_text('{"epochs_teacher": "ten"}'),
         "is malformed: epochs teacher must be an integer, got 'ten'"),
    ],
)
def test_resume_names_a_file_it_did_not_write(tmp_path, capsys, name, write, message):
    out = tmp_path / "run"
    out.mkdir()
    write(out / name)
    assert main(["distill", "--resume", "--quiet", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"srm-ext: error: {out / name} {message}")
    assert err.count("\n") == 1


def test_accumulation_and_clipping_reach_the_trainer_and_bind_a_resume(tmp_path, capsys, monkeypatch):
    from srm_ext.distill import experiment
    from srm_ext.distill.checkpoint import atomic_save, load_checkpoint

    trainers = []

    class Recorded(experiment.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(experiment, "Trainer", Recorded)
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--methods", "scratch", "--seeds", "0", "--epochs-teacher", "2",
             "--epochs-student", "1", "--output-dir", str(out)]
    config = build_config(build_parser().parse_args(
        ["distill", *flags, "--accumulate-steps", "2", "--max-grad-norm", "5"]
    ))
    with pytest.raises(Interrupt):  # after the teacher's first epoch
        ExperimentRunner(config, on_epoch_end=_raise(Interrupt), log=lambda *_: None).run()
    assert [(t.accumulate_steps, t.max_grad_norm) for t in trainers] == [(2, 5.0)]

    # Both change the result, so a resume must keep them.
    assert main(["distill", "--resume", *flags, "--accumulate-steps", "1"]) == 2
    assert "accumulate_steps=1 (checkpoint: 2)" in capsys.readouterr().err
    assert main(["distill", "--resume", *flags, "--max-grad-norm", "1"]) == 2
    assert "max_grad_norm=1.0 (checkpoint: 5.0)" in capsys.readouterr().err
    # A checkpoint from before these settings existed trained with their defaults.
    state = load_checkpoint(out / "checkpoint.pt")
    del state["config"]["accumulate_steps"], state["config"]["max_grad_norm"]
    atomic_save(state, out / "checkpoint.pt")
    assert main(["distill", "--resume", *flags, "--accumulate-steps", "2"]) == 2
    assert "accumulate_steps=2 (checkpoint: 1)" in capsys.readouterr().err
    assert main(["distill", "--resume", *flags]) == 0
    assert [(t.accumulate_steps, t.max_grad_norm) for t in trainers[1:]] == [(1, None)]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("accumulate_steps", 0, "accumulate steps must be >= 1, got 0"),
        ("accumulate_steps", 1.5, "accumulate steps must be an integer, got 1.5"),
        ("accumulate_steps", True, "accumulate steps must be an integer, got True"),
        ("max_grad_norm", 0.0, "max grad norm must be > 0, got 0.0"),
        ("max_grad_norm", -1.0, "max grad norm must be > 0, got -1.0"),
        ("max_grad_norm", float("nan"), "max grad norm must be finite, got nan"),
        ("max_grad_norm", float("inf"), "max grad norm must be finite, got inf"),
        ("max_grad_norm", "1", "max grad norm must be a number, got '1'"),
    ],
)
def test_accumulation_and_clipping_settings_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ExperimentConfig(**{field: value})


@pytest.mark.parametrize("field", ["augment", "flip", "quiet", "compile"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_yes_no_settings_must_be_booleans(field, value):
    # A hand-edited config.json's "false" is a true value in Python.
    with pytest.raises(ConfigError, match=re.escape(f"must be true or false, got {value!r}")):
        ExperimentConfig(**{field: value})


@pytest.mark.parametrize("flags, augment, flip", [((), True, True), (("--no-flip",), True, False),
                                                  (("--no-augment",), False, True)])
def test_no_flip_keeps_the_translations_of_3_channel_images(tmp_path, monkeypatch, flags, augment, flip):
    images = np.random.default_rng(0).integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=images, labels=np.arange(40) % 2)
    seen = {}

    class Recorded(experiment.BatchPreprocessor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.update(augment=self.augment, flip=self.flip)
            raise Interrupt

    monkeypatch.setattr(experiment, "BatchPreprocessor", Recorded)
    args = build_parser().parse_args(
        ["distill", "--dataset", "npz", "--data-path", str(tmp_path / "rgb.npz"),
         "--output-dir", str(tmp_path / "run"), "--quiet", *flags]
    )
    with pytest.raises(Interrupt):
        ExperimentRunner(build_config(args), log=lambda *_: None).run()
    assert seen == {"augment": augment, "flip": flip}


def test_quiet_run_resumes_with_progress(tmp_path):
    def parse(*argv):
        return build_config(build_parser().parse_args(["distill", *argv])).quiet

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(ExperimentConfig(quiet=True).to_dict()))
    assert parse("--resume", "--output-dir", str(out)) is True
    assert parse("--resume", "--no-quiet", "--output-dir", str(out)) is False


def test_resume_on_another_thread_count_warns(tmp_path):
    out = tmp_path / "run"
    settings = {**TINY_CONFIG, "methods": ["scratch"], "epochs_student": 1, "output_dir": str(out)}
    with pytest.raises(Interrupt):
        ExperimentRunner(ExperimentConfig(**settings), on_epoch_end=_raise(Interrupt),
                         log=lambda *_: None).run()
    lines = []
    ExperimentRunner(ExperimentConfig(**{**settings, "threads": 2}), resume=True,
                     log=lines.append).run()
    warnings = [line for line in lines if line.startswith("warning: resuming")]
    assert len(warnings) == 1 and "resuming with 2 thread(s) where the run so far used 1" in warnings[0]
    assert "--threads 1" in warnings[0]


@pytest.mark.parametrize("threads, processes, warned", [(2, 1, False), (3, 1, True), (1, 3, True)])
def test_more_threads_than_cores_are_warned_about(
    tmp_path, monkeypatch, threads, processes, warned
):
    from srm_ext.distill import experiment

    monkeypatch.setattr(experiment, "available_cpu_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    runner = ExperimentRunner(ExperimentConfig(**TINY_CONFIG), log=(lines := []).append)
    runner.ctx = experiment.DistributedContext()
    runner._check_threads_fit_the_cores(threads)
    expected = f"warning: --threads {threads}{f' x {processes} processes' if processes > 1 else ''}"
    assert lines == ([f"{expected} is more than the 2 core(s) available; the run will be slower "
                      "than with fewer"] if warned else [])


def _raise(exc_type):
    def hook(*_args, **_kwargs):
        raise exc_type

    return hook


def test_finished_run_keeps_its_model_file_across_an_interruption(tmp_path, monkeypatch):
    # Interrupted while writing a student's model file: the checkpoint must
    # not yet call the run finished, so --resume trains it and writes the file.
    from srm_ext.distill import experiment

    out = tmp_path / "run"
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, output_dir=str(out))
    real_save = experiment.atomic_save

    def save(obj, path):
        if path.name == "scratch-seed0.pt":
            raise Interrupt
        real_save(obj, path)

    monkeypatch.setattr(experiment, "atomic_save", save)
    with pytest.raises(Interrupt):
        ExperimentRunner(config, log=lambda *_: None).run()
    assert "scratch/seed0" not in torch.load(out / "checkpoint.pt", weights_only=True)["finished"]
    monkeypatch.setattr(experiment, "atomic_save", real_save)
    ExperimentRunner(config, resume=True, log=lambda *_: None).run()
    assert (out / "models" / "scratch-seed0.pt").is_file()


def test_a_run_stopped_after_its_loaded_teachers_file_resumes(tmp_path, monkeypatch):
    # A loaded teacher's file is the first model file a run writes, before any
    # epoch: the run's checkpoint is written before it, so --resume continues
    # the run instead of refusing a directory with models and no checkpoint.
    from srm_ext.distill import experiment

    quiet = dict(log=lambda *_: None)
    source = tmp_path / "source"
    ExperimentRunner(
        ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, output_dir=str(source)), **quiet
    ).run()
    out = tmp_path / "run"
    config = ExperimentConfig(
        **{**TINY_CONFIG, "methods": ["kd"]}, teacher_weights=str(source), output_dir=str(out)
    )
    real_save = experiment.atomic_save

    def save(obj, path):
        real_save(obj, path)
        if path.name == "teacher.pt":
            raise Interrupt

    monkeypatch.setattr(experiment, "atomic_save", save)
    with pytest.raises(Interrupt):
        ExperimentRunner(config, **quiet).run()
    assert (out / "models" / "teacher.pt").is_file()
    monkeypatch.setattr(experiment, "atomic_save", real_save)
    results = ExperimentRunner(config, resume=True, **quiet).run()
    assert [r["run"] for r in results["runs"]] == ["teacher", "kd/seed0"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_interruption_before_the_run_saved_anything_gives_no_resume_hint(
    tmp_path, monkeypatch, capsys, rank
):
    # Nothing of the run is on disk yet: --resume would find no settings and
    # run the defaults. Only rank 0 speaks, as for every other message.
    from srm_ext.distill import experiment

    monkeypatch.setattr(experiment, "load_dataset", _raise(KeyboardInterrupt))
    monkeypatch.setenv("RANK", rank)
    out = tmp_path / "run"
    assert main(["distill", "--preset", "quick", "--quiet", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    said = "interrupted; the run had saved nothing yet; start it again with the same command"
    assert (said in err) is (rank == "0")
    assert "--resume" not in err
    assert not out.exists()


def test_overwrite_leaves_nothing_of_the_previous_run(tmp_path):
    out = tmp_path / "run"
    quiet = dict(log=lambda *_: None)
    ExperimentRunner(ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, output_dir=str(out)),
                     **quiet).run()
    assert (out / "results.json").is_file() and (out / "models" / "scratch-seed0.pt").is_file()
    # A new run into the same directory, stopped after its first epoch.
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ["kd"]}, output_dir=str(out))
    with pytest.raises(Interrupt):
        ExperimentRunner(config, overwrite=True, on_epoch_end=_raise(Interrupt), **quiet).run()
    leftovers = {"results.json", "results.md", "loss_curves.png", "accuracy.png"}
    assert not [name for name in leftovers if (out / name).exists()]
    assert not list((out / "models").glob("*.pt"))


def test_an_overwrite_refused_by_a_check_leaves_the_previous_run(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["distill", *TINY_FLAGS, "--seeds", "0", "--methods", "scratch", "--output-dir", str(out)]
    assert main(flags) == 0
    previous = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert out / "models" / "teacher.pt" in previous
    capsys.readouterr()
    # A mistake found while checking the data and the models deletes nothing.
    assert main([*flags, "--overwrite", "--methods", "sp", "--layer-pairs", "no_such_layer:stage1"]) == 2
    assert "no_such_layer" in capsys.readouterr().err
    # Nor does a teacher to load from among the files the overwrite would delete.
    assert main([*flags, "--overwrite", "--teacher-weights", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"srm-ext: error: --teacher-weights: {out / 'models' / 'teacher.pt'} is one of the files "
        f"that --overwrite deletes from {out}; copy it elsewhere first or choose another "
        "--output-dir\n"
    )
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == previous


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_outputs_of_a_run_without_its_checkpoint_need_overwrite(tmp_path, capsys, resume):
    out = tmp_path / "run"
    flags = ["distill", *TINY_FLAGS, "--seeds", "0", "--methods", "scratch", "--output-dir", str(out)]
    assert main(flags) == 0
    (out / "checkpoint.pt").unlink()  # e.g. to save space
    capsys.readouterr()
    assert main([*flags, *resume, "--student-width", "0.1"]) == 2
    # --resume starts again a run stopped before its first checkpoint, which
    # leaves config.json and metrics.jsonl.
    listed = "results.json, results.md, loss_curves.png, accuracy.png and 2 more" if resume else (
        "config.json, metrics.jsonl, results.json, results.md and 4 more"
    )
    assert capsys.readouterr().err == (
        f"srm-ext: error: {out} holds {listed} (files a run writes) and no checkpoint to "
        "resume; pass --overwrite to replace them or choose another --output-dir\n"
    )
    assert main([*flags, "--overwrite", "--student-width", "0.1"]) == 0
    assert sorted(path.name for path in (out / "models").glob("*.pt")) == ["scratch-seed0.pt", "teacher.pt"]


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl"])
def test_another_programs_file_of_a_name_the_run_writes_needs_overwrite(tmp_path, capsys, name):
    # A model folder's config.json, say: replaced without a word before.
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text('{"model_type": "bert"}\n')
    flags = ["distill", *TINY_FLAGS, "--seeds", "0", "--methods", "scratch", "--output-dir", str(out)]
    assert main(flags) == 2
    assert f"{out} holds {name} (files a run writes)" in capsys.readouterr().err
    assert (out / name).read_text() == '{"model_type": "bert"}\n'
    # --resume reads a config.json as the run's settings, and refuses these;
    # without a run's config.json, a metrics.jsonl is no run's either.
    assert main([*flags, "--resume"]) == 2
    refusal = ("is not the config of a distill run: no run setting is named 'model_type'"
               if name == "config.json" else f"{out} holds {name} (files a run writes)")
    assert refusal in capsys.readouterr().err
    assert (out / name).read_text() == '{"model_type": "bert"}\n'


def test_a_seed_does_not_depend_on_the_other_seeds_listed(tmp_path):
    def models(seeds):
        out = tmp_path / "-".join(map(str, seeds))
        config = ExperimentConfig(**{**TINY_CONFIG, "seeds": seeds, "methods": ["scratch"],
                                     "epochs_teacher": 1, "epochs_student": 1},
                                  output_dir=str(out))
        ExperimentRunner(config, log=lambda *_: None).run()
        return [torch.load(out / "models" / name, weights_only=True)
                for name in ("teacher.pt", "scratch-seed1.pt")]

    # seed 1 alone, and after seed 0 has trained a student
    for alone, listed_second in zip(models([1]), models([0, 1])):
        assert alone.keys() == listed_second.keys()
        assert all(torch.equal(alone[k], listed_second[k]) for k in alone)


def test_a_loaded_teacher_gives_the_students_of_a_teacher_trained_in_the_run(tmp_path):
    logged = []

    def run(name, methods, **settings):
        out = tmp_path / name
        config = ExperimentConfig(**{**TINY_CONFIG, "methods": methods, **settings},
                                  output_dir=str(out))
        return out, ExperimentRunner(config, log=logged.append).run()

    together, together_results = run("together", ["scratch", "kd"])
    first, _ = run("first", ["scratch"])
    # The earlier run's directory, or its teacher's file.
    for source in (first, first / "models" / "teacher.pt"):
        logged.clear()
        later, results = run(f"later-{source.name}", ["kd"], teacher_weights=str(source))
        assert f"loaded teacher from {first / 'models' / 'teacher.pt'}: test accuracy" in "".join(logged)
        assert not [line for line in logged if "warning" in line]  # same data
        records = [json.loads(line) for line in (later / "metrics.jsonl").read_text().splitlines()]
        assert {r["stage"] for r in records} == {"kd"}  # no teacher epochs
        teacher = results["runs"][0]
        assert teacher["run"] == "teacher" and teacher["seed"] is None
        assert teacher["loaded_from"] == str(first / "models" / "teacher.pt")
        assert teacher["stage_times"] == {}
        assert re.search(r"^\| teacher \| .* \| 1 \| loaded \|$", (later / "results.md").read_text(), re.M)
        expected = {r["run"]: r["test_acc"] for r in together_results["runs"]}
        assert {r["run"]: r["test_acc"] for r in results["runs"]} == {
            run: expected[run] for run in ("teacher", "kd/seed0")
        }
        for name in ("teacher.pt", "kd-seed0.pt"):  # bitwise the same models
            want = torch.load(together / "models" / name, weights_only=True)
            got = torch.load(later / "models" / name, weights_only=True)
            assert all(torch.equal(want[k], got[k]) for k in want) and want.keys() == got.keys()


def test_a_teacher_from_a_run_on_other_data_is_loaded_with_a_warning(tmp_path):
    first = tmp_path / "first"
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, output_dir=str(first))
    ExperimentRunner(config, log=lambda *_: None).run()
    # Other images of the same size, channels and classes as digits: the teacher loads.
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "other.npz", images=rng.integers(0, 256, (200, 8, 8), dtype=np.uint8),
             labels=np.arange(200) % 10)
    lines = []
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, dataset="npz",
                              data_path=str(tmp_path / "other.npz"), teacher_weights=str(first),
                              output_dir=str(tmp_path / "later"))
    ExperimentRunner(config, log=lines.append).run()
    warnings = [line for line in lines if line.startswith("warning: the teacher's run normalised")]
    assert len(warnings) == 1 and "(other data?)" in warnings[0]


def test_a_teacher_from_a_run_on_other_classes_is_refused(tmp_path):
    first = tmp_path / "first"
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, output_dir=str(first))
    ExperimentRunner(config, log=lambda *_: None).run()
    later = dict(**{**TINY_CONFIG, "methods": ["scratch"]}, teacher_weights=str(first))
    # At another image size the teacher loads, with a warning.
    lines = []
    ExperimentRunner(ExperimentConfig(**later, image_size=10, output_dir=str(tmp_path / "resized")),
                     log=lines.append).run()
    warnings = [line for line in lines if line.startswith("warning: the teacher's run")]
    assert len(warnings) == 1 and "trained on 8x8 images, this run uses 10x10" in warnings[0]
    # The same number of classes under other names: its outputs would mean other classes.
    settings = json.loads((first / "config.json").read_text())
    settings["resolved"]["class_names"][3:5] = ["four", "three"]
    (first / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=re.escape(
        "--teacher-weights: the teacher's run learnt other classes than this run's data has "
        "(output 3 is 'four' there, '3' here)"
    )):
        ExperimentRunner(ExperimentConfig(**later, output_dir=str(tmp_path / "other")),
                         log=lambda *_: None).run()
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--methods", "scratch", "--seeds", "0", "--epochs-teacher", "1",
             "--epochs-student", "1", "--output-dir", str(out)]
    assert main(["distill", *flags]) == 0
    assert main(["distill", *flags]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["distill", *flags, "--overwrite"]) == 0
    assert main(["distill", *flags, "--resume", "--epochs-student", "3"]) == 2
    assert "epochs_student=3" in capsys.readouterr().err
    # Overwriting would delete the checkpoint and models that resuming keeps.
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", *flags, "--resume", "--overwrite"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert (out / "checkpoint.pt").exists() and list((out / "models").glob("*.pt"))
    with pytest.raises(ConfigError, match="exclude each other"):
        ExperimentRunner(ExperimentConfig(output_dir=str(out)), resume=True, overwrite=True)


class _UnreadableImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise ConfigError(f"'img{index}.png': not a readable image (Truncated File Read)")


def test_an_error_in_a_data_loader_worker_keeps_its_message():
    # The worker's error comes back as "Caught ConfigError in DataLoader
    # worker process 0." and a traceback: the one line shown is its message.
    loader = torch.utils.data.DataLoader(_UnreadableImages(), num_workers=1)
    with pytest.raises(ConfigError) as caught:
        next(iter(loader))
    assert str(caught.value).startswith("Caught ConfigError")
    assert error_line(caught.value) == "'img0.png': not a readable image (Truncated File Read)"


@pytest.mark.parametrize(
    "message, line",
    [
        ("first line\nsecond", "first line"),
        ("\n  indented first\n", "indented first"),
        # Headers are passed over to the line that names the problem.
        ("Error(s) in loading state_dict for ResNet:\n\tMissing key(s): fc.weight", "Missing key(s): fc.weight"),
        ("backend='inductor' raised:\nInvalidCxxCompilerError: no g++", "InvalidCxxCompilerError: no g++"),
        ("only a header:", "only a header:"),
        ("", "OSError"),
    ],
)
def test_an_error_is_shown_by_the_line_that_names_the_problem(message, line):
    assert error_line(OSError(message) if message else OSError()) == line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "npz", "--data-path", "missing.npz"], "does not exist"),
        (["--teacher", "densnet"], "unknown architecture 'densnet' (did you mean densenet"),
        (["--layer-pairs", "block1:stage1,blok2:stage2"], "teacher has no module 'blok2'; closest: block2"),
        (["--sparsity-multiplier", "1.5"], "only K="),
        (["--methods", "srm,magic"], "unknown method(s) magic"),
        (["--layer-pairs", "head.4:stage1"], "4-D"),
        (["--milestones", "0.5,1.5"], "milestones are fractions of the epochs in (0, 1]"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--threads", "-1"], "threads must be >= 1, got -1"),
        (["--train-limit", "-5"], "train limit must be >= 1, got -5"),
        (["--seeds", "0,0"], "must not repeat"),
        (["--seeds", "0,99999999999999999999"], "seeds must lie in [0, 2**32), got 99999999999999999999"),
        (["--teacher-seed", "-1"], "seeds must lie in [0, 2**32), got -1"),
        (["--device", "mps"], "unknown device 'mps'; use auto, cpu, cuda or cuda:N"),
        (["--layer-pairs", "block1:stage1,block1:stage1"], "'block1:stage1' is given more than once"),
        (["--dataset", "npz", "--data-path", "broken.npz"], "broken.npz"),
        (["--output-dir", "a_file"], "a_file"),
        # Checked before any training, though only the SRM stages use them.
        (["--lr-srm", "-1"], "lr_srm must be > 0, got -1.0"),
        (["--local-weight", "-0.5"], "local weight must be >= 0, got -0.5"),
        (["--sparsity-multiplier", "-0.1"], "sparsity multiplier must be > 0, got -0.1"),
        (["--image-size", "2"], "failed on a dry-run batch of shape (2, 1, 2, 2)"),
        (["--image-size", "2"], "; try a larger --image-size"),
        (["--dataset", "cifar10", "--data-path", "cifar-100-python"], "use --dataset cifar100"),
        # a tap on a BatchNorm whose output the next ReLU(inplace=True) overwrites
        (["--methods", "srm", "--layer-pairs", "block1:stage1.0.1"], "modified in place"),
        # Infinite settings are refused before the teacher trains, not as a NaN loss.
        (["--kd-temperature", "inf"], "kd temperature must be finite, got inf"),
        (["--sp-weight", "inf"], "sp weight must be finite, got inf"),
        (["--local-weight", "inf"], "local weight must be finite, got inf"),
        (["--lr", "inf"], "lr must be finite, got inf"),
        (["--weight-decay", "inf"], "weight decay must be finite, got inf"),
        (["--teacher-width", "inf"], "teacher width must be finite, got inf"),
        (["--accumulate-steps", "0"], "accumulate steps must be >= 1, got 0"),
        (["--input-std", "0.5,0"], "input std must be > 0 in every channel, got [0.5, 0.0]"),
        (["--input-mean", "nan"], "input mean must be finite numbers, one per channel, got [nan]"),
        (["--milestones", "0.5"], "--milestones applies to --schedule step only; this run's "
         "schedule is cosine"),
        (["--schedule", "none", "--gamma", "0.5"], "--gamma applies to --schedule step only"),
        (["--momentum", "0.5"], "--momentum applies to --optimizer sgd only; this run's "
         "optimizer is adam"),
        (["--data-path", "broken.npz"], "the digits dataset is built in and reads no --data-path; "
         "name the format of 'broken.npz' with --dataset"),
        (["--input-mean", "0.5,0.5"], "--input-mean gives 2 value(s) but the images have 1 channel(s)"),
        (["--max-grad-norm", "-1"], "max grad norm must be > 0, got -1.0"),
        (["--teacher-weights", "missing.pt"], "--teacher-weights: missing.pt does not exist"),
        (["--teacher-weights", "resnet8.pt"],
         "--teacher-weights: resnet8.pt is not a state dict of the densenet teacher (width 0.34, "
         "10 classes, 1 input channel(s)): Missing key(s) in state_dict: "),
        (["--teacher-weights", "tensor.pt"], "Expected state_dict to be dict-like"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "a_file").write_text("not a directory")
    torch.save(build_model("resnet8", 10, 1).state_dict(), tmp_path / "resnet8.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    _write_cifar_100_folder(tmp_path / "cifar-100-python")
    code = main(["distill", *TINY_FLAGS, "--output-dir", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("srm-ext: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _write_cifar_100_folder(folder: Path) -> None:
    folder.mkdir()
    for name, n in (("train", 6), ("test", 2)):
        batch = {b"data": np.zeros((n, 3072), dtype=np.uint8), b"fine_labels": list(range(90, 90 + n))}
        (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize(
    "error, shown",
    [
        (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                      "allocate memory: you tried to allocate 3221225472 bytes. Error code 12"),
         "3.0 GiB requested"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                                "total capacity of 79.19 GiB"),
         "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB"),
        (MemoryError(), "MemoryError"),
    ],
    ids=["cpu allocator", "cuda", "python"],
)
def test_running_out_of_memory_is_one_line_naming_the_size_flags(monkeypatch, capsys, error, shown):
    from srm_ext import cli

    def run_out(_args):
        raise error

    monkeypatch.setattr(cli, "_distill", run_out)
    assert main(["distill"]) == 2
    assert capsys.readouterr().err == (
        f"srm-ext: error: out of memory ({shown}); use a smaller --batch-size, --image-size, "
        "--teacher-width or --student-width\n"
    )
    with pytest.raises(type(error)):
        main(["--debug", "distill"])


def test_a_collective_left_by_a_stopped_process_is_one_line(monkeypatch, capsys):
    # Under torchrun, the process that stopped printed why: the others say so briefly.
    from srm_ext import cli

    def peer_stopped(_args):
        raise RuntimeError(
            "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
            "peer [127.0.0.1]:13731. This is typically caused by a remote worker crashing."
        )

    monkeypatch.setattr(cli, "_distill", peer_stopped)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["distill"]) == 2
    assert capsys.readouterr().err.startswith(
        "srm-ext: error: another process of the run stopped (see its error); this one "
        "left the collective it was in ([/pytorch/third_party/gloo/"
    )
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main(["--debug", "distill"])
    monkeypatch.setenv("WORLD_SIZE", "1")  # no other process: a bug, with its traceback
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main(["distill"])


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    from srm_ext import cli

    def fail(_args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_distill", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["distill"])


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="blok2"):
        main(["--debug", "distill", *TINY_FLAGS, "--output-dir", str(tmp_path / "r"),
              "--layer-pairs", "blok2:stage2"])
    proc = run_cli("distill", "--debug", "--teacher", "nope", "--output-dir", str(tmp_path / "r"),
                   cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_error_from_subprocess_has_no_traceback(tmp_path):
    proc = run_cli("distill", "--student", "resnet7", "--output-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()
    ] and "unknown architecture 'resnet7'" in proc.stderr


def test_resnet_pair_with_the_other_baselines(tmp_path):
    out = tmp_path / "run"
    code = main([
        "distill", *TINY_FLAGS, "--teacher", "resnet14", "--student", "resnet8",
        "--methods", "fitnet,sp,at", "--seeds", "0", "--epochs-teacher", "1",
        "--epochs-init", "1", "--epochs-student", "1", "--output-dir", str(out),
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["teacher", "fitnet", "sp", "at"]
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"fitnet-hint", "fitnet-kd", "sp", "at"} <= stages


def test_bench_forwards_its_arguments(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("srm_ext.benchmark")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "srm_ext.benchmark", fake)
    monkeypatch.setattr("srm_ext.benchmark", fake, raising=False)
    assert main(["bench", "--sizes", "small", "-h"]) == 0
    assert seen == [["--sizes", "small", "-h"]]


@pytest.mark.parametrize("flag", ["--layer-pairs", "--methods", "--seeds", "--input-mean"])
@pytest.mark.parametrize("value", ["", ",,"])
def test_an_empty_list_flag_is_a_usage_error(capsys, flag, value):
    # Not taken as "no value", which would run the default without a word.
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["distill", flag, value])
    assert stop.value.code == 2
    assert f"{flag}: expected a comma-separated list, got {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, warned",
    [
        (["--methods", "scratch,kd", "--sp-weight", "10", "--kd-alpha", "0.5"],
         ["--sp-weight is not used by --methods scratch,kd; it applies to sp"]),
        (["--methods", "scratch", "--layer-pairs", "a:b", "--lr-srm", "0.1", "--epochs-init", "3"],
         ["--lr-srm is not used by --methods scratch; it applies to fitnet, srm",
          "--layer-pairs is not used by --methods scratch; it applies to fitnet, sp, at, srm"]),
        (["--methods", "fitnet", "--lr-srm", "0.01", "--kd-temperature", "2"], []),
        (["--codeword-multiplier", "3"], []),  # srm is a default method
    ],
)
def test_flags_no_chosen_method_reads_are_warned_about(capsys, flags, warned):
    build_config(build_parser().parse_args(["distill", *flags]))
    assert capsys.readouterr().err.splitlines() == [f"srm-ext: warning: {w}" for w in warned]


def test_unread_layer_pairs_are_not_resolved(tmp_path, capsys):
    # Warned about as unused, they must not then fail the run.
    out = tmp_path / "run"
    assert main(["distill", *TINY_FLAGS, "--methods", "scratch", "--layer-pairs", "foo:bar",
                 "--output-dir", str(out)]) == 0
    assert "--layer-pairs is not used by --methods scratch" in capsys.readouterr().err
    assert (out / "results.json").exists()


def test_only_rank_0_warns_about_unread_flags(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    build_config(build_parser().parse_args(["distill", "--methods", "kd", "--sp-weight", "10"]))
    assert capsys.readouterr().err == ""


def test_schedule_flags_reach_every_scheduled_stage():
    args = build_parser().parse_args(
        ["distill", "--optimizer", "sgd", "--momentum", "0.8", "--schedule", "step",
         "--milestones", "0.5,0.75", "--gamma", "0.2"]
    )
    config = build_config(args)
    for kind in ("teacher", "student"):
        stage = config.stage(kind)
        assert (stage.optimizer, stage.momentum, stage.schedule) == ("sgd", 0.8, "step")
        assert stage.milestones == (0.5, 0.75) and stage.gamma == 0.2
    # SRM stages 1 and 2 keep a constant lr (see ExperimentConfig.stage).
    assert config.stage("dictionary").schedule == "none"


def test_accumulation_and_clipping_flags():
    config = build_config(build_parser().parse_args(["distill"]))
    assert (config.accumulate_steps, config.max_grad_norm) == (1, None)
    config = build_config(build_parser().parse_args(
        ["distill", "--accumulate-steps", "4", "--max-grad-norm", "1.5"]
    ))
    assert (config.accumulate_steps, config.max_grad_norm) == (4, 1.5)


# --------------------------------------------------------------------------- --compile


class CompileRecord:
    def __init__(self) -> None:
        self.models: list[nn.Module] = []  # what the runner compiled, in order
        self.graphs: list[torch.fx.GraphModule] = []  # what dynamo captured from them


@pytest.fixture
def eager_compile(monkeypatch):
    """``Module.compile`` with dynamo capturing graphs that run eagerly: the
    wiring of --compile without inductor, which takes minutes to generate
    code on a small CPU. The backend runs the kernels of the plain model, so
    the numbers must equal an uncompiled run's bit for bit. Dynamo starts as
    in a new process: hook guards off (torch's default), no compiled code."""
    record = CompileRecord()
    compile_in_place = nn.Module.compile

    def capture(graph, example_inputs):
        record.graphs.append(graph)
        return graph.forward

    def compile_eagerly(module, *args, **kwargs):
        assert not args and not kwargs  # torch.compile's defaults: inductor, mode "default"
        record.models.append(module)
        compile_in_place(module, backend=capture)

    monkeypatch.setattr(nn.Module, "compile", compile_eagerly)
    torch.compiler.reset()
    # patch, not monkeypatch: pytest 9.2's monkeypatch undo deletes the setting.
    with dynamo_config.patch(skip_nnmodule_hook_guards=True):
        yield record
    torch.compiler.reset()


def test_compile_flag_merges_with_presets_and_saved_configs(tmp_path):
    def parse(*argv):
        return build_config(build_parser().parse_args(["distill", *argv])).compile

    assert parse() is False
    assert parse("--compile") is True and parse("--preset", "quick", "--compile") is True
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(ExperimentConfig(compile=True).to_dict()))
    # A resume keeps the run's setting unless told otherwise, either way.
    assert parse("--resume", "--output-dir", str(out)) is True
    assert parse("--resume", "--no-compile", "--output-dir", str(out)) is False


def test_compile_runs_teacher_and_students_compiled_to_the_same_numbers(
    tmp_path, eager_compile, recwarn
):
    # A ResNet-8 teacher: dynamo traces it in a third of the DenseNet's time.
    flags = [*TINY_FLAGS, "--teacher", "resnet8", "--methods", "kd,srm", "--seeds", "0"]
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    assert main(["distill", *flags, "--output-dir", str(plain)]) == 0
    assert not eager_compile.models
    assert main(["distill", *flags, "--compile", "--output-dir", str(compiled)]) == 0

    # The teacher, then each method's student, compiled in place and run compiled.
    assert [type(m).__name__ for m in eager_compile.models] == ["ResNet", "AllCNN", "AllCNN"]
    assert all(m._compiled_call_impl is not None for m in eager_compile.models)
    assert eager_compile.graphs
    # The runner turned dynamo's hook guards on before the first compiled call,
    # so the SRM taps neither warned nor dropped the compiled code; and back off after.
    assert not [w for w in recwarn if "skip_nnmodule_hook_guards" in str(w.message)]
    assert dynamo_config.skip_nnmodule_hook_guards
    assert json.loads((compiled / "config.json").read_text())["compile"] is True
    assert json.loads((plain / "config.json").read_text())["compile"] is False

    assert _final_numbers(compiled) == _final_numbers(plain)  # accuracies and every loss
    names = sorted(path.name for path in (plain / "models").glob("*.pt"))
    assert names == ["kd-seed0.pt", "srm-seed0.pt", "teacher.pt"]
    for name in names:
        expected = torch.load(plain / "models" / name, weights_only=True)
        got = torch.load(compiled / "models" / name, weights_only=True)
        assert got.keys() == expected.keys()  # the plain model's, no "_orig_mod."
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


@pytest.mark.parametrize(
    "compile_first, resume_flags, compile_resumed",
    [(True, ["--no-compile"], False), (False, ["--compile"], True)],
)
def test_a_resume_may_turn_compile_on_or_off(
    tmp_path, eager_compile, compile_first, resume_flags, compile_resumed
):
    straight = tmp_path / "straight"
    settings = {**TINY_CONFIG, "teacher": "resnet8"}  # quick to trace
    ExperimentRunner(ExperimentConfig(**settings, output_dir=str(straight)), log=lambda *_: None).run()

    out = tmp_path / "run"
    seen = []

    def stop(record):  # inside SRM stage 2, after the teacher and scratch finished
        seen.append(record)
        if len(seen) == 6:
            raise Interrupt

    config = ExperimentConfig(**settings, compile=compile_first, output_dir=str(out))
    with pytest.raises(Interrupt):
        ExperimentRunner(config, on_epoch_end=stop, log=lambda *_: None).run()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["current"]["run"] == "srm/seed0"
    keys = [*saved["weights"]["teacher"]]
    keys += [key for module in saved["current"]["modules"].values() for key in module]
    assert keys and not [key for key in keys if "_orig_mod" in key]

    eager_compile.models.clear()
    assert main(["distill", "--resume", "--quiet", *resume_flags, "--output-dir", str(out)]) == 0
    # the finished teacher, loaded to distil from, and the SRM student
    assert len(eager_compile.models) == (2 if compile_resumed else 0)
    assert json.loads((out / "config.json").read_text())["compile"] is compile_resumed
    assert _final_numbers(out) == _final_numbers(straight)


def test_compile_where_torch_compile_cannot_run_is_refused_naming_the_flag(
    tmp_path, capsys, monkeypatch
):
    import torch._inductor.config as inductor_config

    from srm_ext.distill.experiment import check_compile_supported

    def unsupported():
        raise RuntimeError("Python 3.15+ not yet supported for torch.compile")

    torch.compiler.reset()  # no compiled probe left over from an earlier test
    monkeypatch.setattr(torch._dynamo.eval_frame, "check_if_dynamo_supported", unsupported)
    out = tmp_path / "run"
    assert main(["distill", *TINY_FLAGS, "--compile", "--output-dir", str(out)]) == 2
    # Older torch raises it from inside the backend, which prefixes the error's type.
    assert re.fullmatch(
        r"srm-ext: error: --compile is not available here: torch\.compile fails on cpu "
        r"\((RuntimeError: )?Python 3\.15\+ not yet supported for torch\.compile\); "
        r"run without it\n",
        capsys.readouterr().err,
    )
    assert not out.exists()  # refused before anything ran
    monkeypatch.undo()

    # Inductor's CPU code with no working C++ compiler.
    torch.compiler.reset()
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        with pytest.raises(ConfigError) as refused:
            check_compile_supported(torch.device("cpu"))
    message = str(refused.value)
    assert message.startswith("--compile is not available here: torch.compile fails on cpu (")
    assert "no-such-g++" in message and "\n" not in message

    torch.compiler.reset()
    check_compile_supported(torch.device("cpu"))  # this machine's toolchain works
