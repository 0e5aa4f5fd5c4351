"""The experiment behind ``srm-ext distill``: train a teacher, then students with
each method over several seeds, and report held-out accuracy.

Fault tolerance: after every epoch the complete state (models, optimiser,
scheduler, RNG states of every process, epoch counters, finished runs, metric
history) goes into ``checkpoint.pt`` atomically, so an interrupted experiment
resumed with ``resume=True`` loses at most the epoch in progress and ends with
the same numbers as an uninterrupted one (data order comes from per-epoch seeded
samplers, augmentation from the restored RNG states). A resume refuses settings
or data that differ from the checkpoint's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo.config as dynamo_config
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import (
    atomic_save,
    cpu_state_dict,
    gather_rng_states,
    load_checkpoint,
    seed_everything,
    set_rng_state,
)
from .config import (
    PAIRED_METHODS,
    RESUME_INVARIANT_EXCLUDES,
    ConfigError,
    ExperimentConfig,
    error_line,
)
from .data import BatchPreprocessor, DatasetSplits, load_dataset, make_loaders
from .data_fingerprint import dataset_fingerprint, fingerprint_differences
from .distiller import SRMDistiller
from .distributed import DistributedContext, init_distributed, resolve_device, shutdown_distributed
from .hooks import FeatureTap, FeatureTapError
from .image_check import check_images
from .methods import MethodPlan, attention_transfer_weight, build_plan, cross_entropy_stage
from .metrics import accuracy
from .models import build_model, default_layer_pairs
from .plots import plot_accuracy, plot_loss_curves
from .report import markdown_table, summarise
from .trained import MODELS_DIR, find_state_dict, model_path, run_settings
from .trainer import Trainer

__all__ = ["ExperimentRunner", "run_experiment", "parse_layer_pairs"]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# Written when a run starts, before its first checkpoint.
_RUN_RECORDS = ("config.json", "metrics.jsonl")
_STATE_KEYS = {"format", "config", "finished", "history", "current", "weights"}


def available_cpu_cores() -> int:
    """The cores this process may run on: its affinity mask (a container's or a
    scheduler's cpuset) where the platform has one, else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def default_cpu_threads(context: DistributedContext) -> int:
    """Half the cores per process, at least one. The models here are small, so more
    intra-op threads barely help, and on a shared CPU every op's thread barrier
    waits for descheduled threads (10x slowdowns seen on two busy cores)."""
    return max(1, available_cpu_cores() // 2 // context.world_size)


def _compile_probe(t: Tensor) -> Tensor:
    return torch.relu(t) + 1


def check_compile_supported(device: torch.device) -> None:
    """Refuse ``compile`` before any training where torch.compile cannot run.

    Compiles and runs a one-line function on ``device`` with torch.compile's
    defaults (a few seconds), so every reason is caught the same way: a Python
    that dynamo does not support, no working C++ compiler for inductor's CPU
    code, no Triton for its GPU code."""
    try:
        torch.compile(_compile_probe, fullgraph=True, dynamic=False)(torch.zeros(2, device=device))
    except Exception as exc:  # whatever the backend raises, reported in one line
        raise ConfigError(
            f"--compile is not available here: torch.compile fails on {device.type} "
            f"({error_line(exc)}); run without it"
        ) from None


def parse_layer_pairs(specs: list[str]) -> list[tuple[str, str]]:
    """``["teacher.path:student.path", ...]`` -> list of pairs."""
    pairs = []
    for spec in specs:
        teacher_path, sep, student_path = spec.partition(":")
        if not sep or not teacher_path or not student_path:
            raise ConfigError(f"layer pair {spec!r} must look like TEACHER_PATH:STUDENT_PATH")
        pair = (teacher_path.strip(), student_path.strip())
        if pair in pairs:
            raise ConfigError(f"layer pair {spec!r} is given more than once")
        pairs.append(pair)
    return pairs


class ExperimentRunner:
    """Runs (or resumes) one experiment into ``config.output_dir``.

    Args:
        config: what to run.
        resume: continue from ``output_dir/checkpoint.pt`` if present.
        overwrite: start afresh even when ``output_dir`` holds a checkpoint.
        on_epoch_end: called with each epoch's metrics record after it is
            checkpointed (on every process).
        log: where progress lines go (main process only).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if resume and overwrite:
            # Overwriting deletes the checkpoint and the models a resume keeps.
            raise ConfigError("resume and overwrite exclude each other: choose one")
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.on_epoch_end = on_epoch_end
        self.out = Path(config.output_dir)
        self._log = log
        self.state: dict[str, Any] = {}
        # Whether this run's config and checkpoint are in the output directory,
        # so that an interruption from now on can be continued with resume.
        self.resumable = False

    @staticmethod
    def saved_config(output_dir: str | Path) -> dict[str, Any] | None:
        """The config of the run in ``output_dir``: its checkpoint's, or, for a
        run stopped before its first checkpoint, its ``config.json``."""
        path = Path(output_dir) / CHECKPOINT
        if path.exists():
            return _load_state(path)["config"]
        path = Path(output_dir) / "config.json"
        if not path.exists():
            return None
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc})") from None
        _check_saved_config(config, path)
        # Another program's config.json (a model folder's, say) is no run to resume.
        settings = {field.name for field in dataclasses.fields(ExperimentConfig)}
        unknown = sorted(set(config) - settings - {"resolved"})
        if unknown:
            raise ConfigError(
                f"{path} is not the config of a distill run: no run setting is named "
                f"{', '.join(map(repr, unknown))}"
            )
        return config

    # ------------------------------------------------------------------ driver

    def run(self) -> dict[str, Any]:
        """Run everything not yet finished; returns the results (also written to
        ``results.json``)."""
        started_group = not (dist.is_available() and dist.is_initialized())
        self.ctx = init_distributed(self.config.device)
        if not self.ctx.is_main:
            self._log = lambda *_: None
        # Dynamo does not guard on module hooks by default, so the feature taps,
        # finding a compiled model, turn the guards on, clear all compiled code
        # and warn (see hooks._guard_module_hooks). Compiling the models itself,
        # the runner turns the guards on before their first call instead: no
        # recompile, no warning. The setting is global, so it is restored after.
        guards = (
            dynamo_config.patch(skip_nnmodule_hook_guards=False)
            if self.config.compile
            else contextlib.nullcontext()
        )
        try:
            with guards:
                return self._run()
        finally:
            if started_group:
                shutdown_distributed()

    def _run(self) -> dict[str, Any]:
        cfg = self.config
        started = time.perf_counter()
        self.device = resolve_device(cfg.device, self.ctx)
        if cfg.compile:
            check_compile_supported(self.device)
        if cfg.threads or self.device.type == "cpu":
            torch.set_num_threads(cfg.threads or default_cpu_threads(self.ctx))
        if cfg.threads:
            self._check_threads_fit_the_cores(cfg.threads)
        self._load_or_init_state()
        # Every check of the data and the models comes first: a mistake must
        # leave the output directory as it was, an earlier run in it included.
        try:
            self.splits = load_dataset(cfg)
        except ConfigError as exc:
            missing = cfg.data_path is not None and not Path(cfg.data_path).exists()
            if missing and _fingerprint_survives_a_move(self.state):
                raise ConfigError(
                    f"{exc}; if the data moved, resume with --data-path naming its new place"
                ) from None
            raise
        if cfg.check_images:
            check_images(self.splits, cfg.num_workers, not cfg.quiet, self.ctx, self.device)
        self._check_dataset()
        preprocess = BatchPreprocessor(
            self.splits.mean,
            self.splits.std,
            augment=cfg.augment,
            pad=max(1, self.splits.image_size // 8),
            flip=cfg.flip and self.splits.natural_images,
        )
        self.trainer = Trainer(
            self.device,
            preprocess,
            amp=cfg.amp,
            progress=not cfg.quiet,
            context=self.ctx,
            log=None if cfg.quiet else self._log,
            accumulate_steps=cfg.accumulate_steps,
            max_grad_norm=cfg.max_grad_norm,
        )
        _, self.test_loader = make_loaders(self.splits, cfg.batch_size, 0, self.ctx, cfg.num_workers)
        self.example = self._example_batch(self.splits)
        self.layer_pairs = self._check_layer_pairs()
        if cfg.teacher_weights:
            self._check_teacher_run_classes()
        if self.overwrite:
            self._check_teacher_weights_survive_overwrite()
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.overwrite:
                for path in self._previous_outputs():
                    path.unlink()
            self._write_config(self._resolved_settings())
            with open(self.out / "metrics.jsonl", "w") as f:  # the checkpoint's history is the truth
                f.writelines(json.dumps(r) + "\n" for r in self.state["history"])
            # A checkpoint before any model file: a run stopped between a loaded
            # teacher's file and its first epoch is resumed, not taken for an old one.
            self._save()
        self.ctx.barrier()
        self.resumable = True

        teacher = self._teacher()
        for seed in cfg.seeds:
            for method in cfg.methods:
                self._execute(
                    f"{method}/seed{seed}",
                    method,
                    seed,
                    functools.partial(self._student_plan, method, teacher),
                )
        results = self._report(time.perf_counter() - started)
        self.ctx.barrier()
        return results

    # ------------------------------------------------------------------ setup

    def _load_or_init_state(self) -> None:
        path = self.out / CHECKPOINT
        config = self.config.to_dict()
        if path.exists() and self.resume:
            state = _load_state(path)
            # A setting added since the checkpoint was written held its default
            # there, as build_config assumes when it fills in a saved config.
            saved = {**ExperimentConfig().to_dict(), **state["config"]}
            # Data moved elsewhere may go on: the dataset's fingerprint, where the
            # checkpoint has one that names files by their path in the tree (its
            # format 2), tells whether it is the same data.
            moved = ("data_path",) if _fingerprint_survives_a_move(state) else ()
            changed = [
                f"{key}={config.get(key)!r} (checkpoint: {value!r})"
                for key, value in saved.items()
                if key not in RESUME_INVARIANT_EXCLUDES + moved and config.get(key) != value
            ]
            if changed:
                raise ConfigError(
                    f"cannot resume {self.out}: settings differ from the checkpoint: "
                    + ", ".join(changed)
                )
            self.state = state
            self.state["config"] = config
            self.resumable = True
            self._log(f"resuming {self.out}: {len(state['finished'])} run(s) finished")
            self._check_threads()
            return
        if path.exists() and not self.overwrite:
            raise ConfigError(
                f"{self.out} already holds a run; pass --resume to continue it or "
                "--overwrite to start again"
            )
        previous = self._previous_outputs()
        if self.resume and self.saved_config(self.out) is not None:
            # A run stopped before its first checkpoint left these: --resume
            # takes its settings from that config.json and starts it again.
            previous = [path for path in previous if path.name not in _RUN_RECORDS]
        if previous and not self.overwrite:
            # An earlier run's checkpoint is gone, so nothing can be resumed,
            # but its models would stand beside the new run's as if they were
            # of it; or another program's files would be replaced.
            names = [str(path.relative_to(self.out)) for path in previous]
            listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise ConfigError(
                f"{self.out} holds {listed} (files a run writes) and no checkpoint to resume; "
                "pass --overwrite to replace them or choose another --output-dir"
            )
        if self.resume:
            self._log(f"no checkpoint in {self.out}; starting a new run")
        self.state = {
            "format": CHECKPOINT_FORMAT,
            "config": config,
            "finished": {},
            "history": [],
            "current": None,
            "weights": {},
            "threads": torch.get_num_threads(),
        }

    def _check_dataset(self) -> None:
        """A resumed run goes on with the data it started with, or not at all."""
        current = dataset_fingerprint(self.splits)
        saved = self.state.get("dataset")  # absent from a checkpoint of an older version
        if saved is not None:
            # An older checkpoint's digests hold an image tree's full paths.
            compared = (
                current if "format" in saved else dataset_fingerprint(self.splits, full_paths=True)
            )
            differences = fingerprint_differences(saved, compared)
            if differences:
                raise ConfigError(
                    f"cannot resume {self.out}: the dataset differs from the one the run started "
                    f"with: {'; '.join(differences)}. Restore that data, or pass --overwrite to "
                    "start again on this"
                )
        self.state["dataset"] = current

    def _check_threads_fit_the_cores(self, threads: int) -> None:
        """More threads than cores make every op's thread barrier wait for
        descheduled threads: a slower run, not a wrong one, so a warning."""
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.ctx.world_size))
        cores = available_cpu_cores()
        if threads * processes > cores:
            per = f" x {processes} processes" if processes > 1 else ""
            self._log(
                f"warning: --threads {threads}{per} is more than the {cores} core(s) available; "
                "the run will be slower than with fewer"
            )

    def _check_threads(self) -> None:
        """CPU kernels split their sums by thread count: a resume on another
        count may end with numbers that differ in the last bits."""
        saved, threads = self.state.get("threads"), torch.get_num_threads()
        if saved is not None and saved != threads and self.device.type == "cpu":
            self._log(
                f"warning: resuming with {threads} thread(s) where the run so far used {saved}: "
                "its numbers may differ in the last bits from an uninterrupted run "
                f"(pass --threads {saved} to match it)"
            )
        self.state["threads"] = threads

    def _write_config(self, resolved: dict[str, Any] | None = None) -> None:
        """``config.json``: the settings, and once known what the automatic
        ones resolved to (ignored when the file is read back as a config)."""
        config = dict(self.state["config"])
        if resolved is not None:
            config["resolved"] = resolved
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def _resolved_settings(self) -> dict[str, Any]:
        resolved = {
            "device": str(self.device),
            "processes": self.ctx.world_size,
            "threads": torch.get_num_threads(),
            "layer_pairs": [f"{t}:{s}" for t, s in self.layer_pairs],
            "image_size": self.splits.image_size,
            # What load_trained_model needs to rebuild the models and their input.
            "num_classes": self.splits.num_classes,
            "in_channels": self.splits.in_channels,
            "mean": list(self.splits.mean),
            "std": list(self.splits.std),
        }
        if self.splits.class_names is not None:  # the label each output stands for
            resolved["class_names"] = list(self.splits.class_names)
        if "at" in self.config.methods:
            resolved["at_weight"] = attention_transfer_weight(self.config)
        return resolved

    def _previous_outputs(self) -> list[Path]:
        """The files here that a run writes (an earlier run's, or another
        program's of the same name), which ``overwrite`` deletes so that no stale
        result or model outlives the new run."""
        names = (CHECKPOINT, *_RUN_RECORDS, "results.json", "results.md", "loss_curves.png",
                 "accuracy.png")
        found = [self.out / name for name in names if (self.out / name).exists()]
        return found + sorted((self.out / MODELS_DIR).glob("*.pt"))

    def _check_teacher_weights_survive_overwrite(self) -> None:
        if self.config.teacher_weights is None:
            return
        source = self._teacher_weights_file().resolve()
        if source in {path.resolve() for path in self._previous_outputs()}:
            raise ConfigError(
                f"--teacher-weights: {source} is one of the files that --overwrite deletes "
                f"from {self.out}; copy it elsewhere first or choose another --output-dir"
            )

    def _example_batch(self, splits: DatasetSplits) -> Tensor:
        images = torch.stack([splits.train[i][0] for i in range(min(2, len(splits.train)))])
        return self.trainer.preprocess(images.to(self.device), False)

    def _new_model(self, role: str) -> nn.Module:
        arch, width = self.config.architecture(role)
        return build_model(arch, self.splits.num_classes, self.splits.in_channels, width).to(self.device)

    def _run_model(self, role: str) -> nn.Module:
        """A new teacher or student for the runs, compiled with ``compile``. In
        place (``model.compile()``, not ``torch.compile(model)``), so its
        state_dict keys stay those of the plain model, without ``_orig_mod.``:
        checkpoints and model files load alike with and without compiling.

        Under torchrun each process compiles its own replica, and nothing more
        is needed: gradients are all-reduced after the backward pass (see
        distributed.py), not inside it by a DistributedDataParallel wrapper,
        at whose gradient buckets torch.compile would have to split its graphs."""
        model = self._new_model(role)
        if self.config.compile:
            model.compile()
        return model

    def _check_layer_pairs(self) -> list[tuple[str, str]]:
        """Resolve the layer pairs and fail before any training when a model
        does not give logits for the dataset's classes, a path is missing, a
        hooked output is not 4-D or the SRM sizes are impossible."""
        teacher, student = self._new_model("teacher"), self._new_model("student")
        try:
            # A loaded teacher is only evaluated: its train-mode output is never read.
            self._check_logits(teacher, "teacher", trained=not self.config.teacher_weights)
            self._check_logits(student, "student")
            if not set(self.config.methods) & set(PAIRED_METHODS):
                # Scratch and KD tap no layers: a model needs no feature_stages,
                # and given pairs go unused (the CLI warns so).
                return []
            if self.config.layer_pairs:
                pairs = parse_layer_pairs(self.config.layer_pairs)
            else:
                pairs = list(default_layer_pairs(teacher, student).items())
            if "srm" in self.config.methods:
                SRMDistiller(
                    teacher,
                    student,
                    pairs,
                    self.config.codeword_multiplier,
                    self.config.sparsity_multiplier,
                    example_input=self.example,
                )
            else:
                FeatureTap(teacher, [t for t, _ in pairs], "teacher").probe(self.example)
                FeatureTap(student, [s for _, s in pairs], "student").probe(self.example)
        except FeatureTapError:
            raise
        except RuntimeError as exc:
            # A model that cannot take the dataset's inputs at all: images too
            # small for its kernels or pooling, or inputs of another kind.
            too_small = min(self.example.shape[-2:]) < 16 and "size" in str(exc).lower()
            hint = "; try a larger --image-size" if too_small else ""
            raise ConfigError(f"{error_line(exc)}{hint}") from exc
        return pairs

    def _check_logits(self, model: nn.Module, role: str, trained: bool = True) -> None:
        """The model must map a batch to (N, classes) logits, which a user's
        own model may not (a torchvision one has 1000 classes unless told),
        in eval mode and, if it is ``trained``, in train mode, where some
        return more (Inception's auxiliary logits)."""
        tap = FeatureTap(model, [], role)
        runs = [("", lambda: tap.probe(self.example, return_output=True)[1])]
        if trained:
            runs.append((" in train mode", lambda: tap.train_mode_output(self.example)))
        for mode, run in runs:
            output = run()
            expected = (len(self.example), self.splits.num_classes)
            if isinstance(output, Tensor) and tuple(output.shape) == expected:
                continue
            got = (
                f"shape {tuple(output.shape)}" if isinstance(output, Tensor)
                else type(output).__name__
            )
            arch, _ = self.config.architecture(role)
            raise ConfigError(
                f"the {role} {arch!r} maps a batch of {expected[0]} images to {got}{mode}; "
                f"expected logits of shape {expected} for the dataset's {expected[1]} classes"
            )

    # ------------------------------------------------------------------ runs

    def _teacher(self) -> nn.Module:
        def plan() -> MethodPlan:
            teacher = self._run_model("teacher")
            stage = cross_entropy_stage("teacher", teacher, self.config.stage("teacher"))
            return MethodPlan(teacher, {"teacher": teacher}, [stage])

        run_id = "teacher"
        if run_id in self.state["finished"]:
            teacher = self._run_model("teacher")  # compiled too: the students' stages run it
            teacher.load_state_dict(self.state["weights"][run_id])
        elif self.config.teacher_weights is not None:
            teacher = self._load_teacher(run_id)
        else:
            teacher = self._execute(
                run_id, "teacher", self.config.teacher_seed, plan, keep_weights=True
            )
        teacher.eval()
        return teacher

    def _teacher_weights_file(self) -> Path:
        path = Path(self.config.teacher_weights)
        if path.is_dir():  # an earlier run's output directory
            path = model_path(path, "teacher")
        return path

    def _load_teacher(self, run_id: str) -> nn.Module:
        """The teacher from ``teacher_weights`` instead of training one: kept
        in the checkpoint and the run's model files like a trained one."""
        path = self._teacher_weights_file()
        if not path.is_file():
            raise ConfigError(f"--teacher-weights: {path} does not exist")
        teacher = self._run_model("teacher")
        weights, found = find_state_dict(load_checkpoint(path), teacher)
        if found:
            self._log(f"--teacher-weights: the teacher's weights are {path}'s, {', '.join(found)}")
        try:
            teacher.load_state_dict(weights)
        except (RuntimeError, TypeError) as exc:  # wrong keys or shapes, or not a dict
            arch, width = self.config.architecture("teacher")
            reason = error_line(exc)
            if len(reason) > 200:  # a missing-keys line lists every key
                reason = reason[:200] + " ..."
            raise ConfigError(
                f"--teacher-weights: {path} is not a state dict of the {arch} teacher "
                f"(width {width}, {self.splits.num_classes} classes, "
                f"{self.splits.in_channels} input channel(s)): {reason}"
            ) from None
        # A diverged teacher's NaN would otherwise surface as the students' loss.
        broken = [
            name
            for name, value in teacher.state_dict().items()
            if value.is_floating_point() and not torch.isfinite(value).all()
        ]
        if broken:
            raise ConfigError(
                f"--teacher-weights: {path} holds NaN or inf values ({broken[0]}, ...); "
                "the teacher it was saved from diverged"
            )
        self._warn_if_teacher_run_differs()
        return self._finish(run_id, "teacher", None, teacher, keep_weights=True, loaded_from=path)

    def _teacher_run_settings(self) -> dict[str, Any] | None:
        """What the earlier run whose models/teacher.pt ``teacher_weights``
        names recorded of its input (config.json's ``resolved``): its classes,
        image size and input normalisation (its training split's channel
        statistics, or those it was given); None for a teacher from elsewhere."""
        teacher_file = self._teacher_weights_file()
        if teacher_file.parent.name != MODELS_DIR:
            return None
        try:
            return run_settings(teacher_file.parent.parent)["resolved"]
        except ConfigError:  # not a run that recorded its input: nothing to compare
            return None

    def _check_teacher_run_classes(self) -> None:
        """A teacher from an earlier run of other classes is refused, before
        anything is written: its outputs would stand for its own classes."""
        recorded = (self._teacher_run_settings() or {}).get("class_names")
        names = self.splits.class_names
        if recorded is None or names is None or list(recorded) == list(names):
            return
        label = next((i for i, (a, b) in enumerate(zip(recorded, names)) if a != b), None)
        where = (
            f"output {label} is {recorded[label]!r} there, {names[label]!r} here"
            if label is not None
            else f"{len(recorded)} classes there, {len(names)} here"
        )
        raise ConfigError(
            f"--teacher-weights: the teacher's run learnt other classes than this run's data "
            f"has ({where})"
        )

    def _warn_if_teacher_run_differs(self) -> None:
        """A teacher from an earlier run of another image size or input
        normalisation may only do worse here: say so."""
        recorded = self._teacher_run_settings()
        if recorded is None:
            return
        differences = []
        size = recorded.get("image_size", self.splits.image_size)
        if size != self.splits.image_size:
            differences.append(
                f"trained on {size}x{size} images, this run uses "
                f"{self.splits.image_size}x{self.splits.image_size}"
            )
        mean, std = list(self.splits.mean), list(self.splits.std)
        if (recorded["mean"], recorded["std"]) != (mean, std):
            differences.append(
                f"normalised its inputs with mean {recorded['mean']} and std {recorded['std']}, "
                f"this run with mean {mean} and std {std} (other data?)"
            )
        if differences:
            self._log(
                f"warning: the teacher's run {' and '.join(differences)}: the teacher may do "
                "worse here than it did there"
            )

    def _student_plan(self, method: str, teacher: nn.Module) -> MethodPlan:
        return build_plan(
            method, teacher, self._run_model("student"), self.layer_pairs, self.example, self.config
        )

    def _execute(
        self,
        run_id: str,
        method: str,
        seed: int,
        make_plan: Callable[[], MethodPlan],
        keep_weights: bool = False,
    ) -> nn.Module | None:
        """Train one run (resuming it if the checkpoint stopped inside it); returns
        the trained model, or None if the run had already finished."""
        if run_id in self.state["finished"]:
            return None
        seed_everything(seed)  # same init per seed for every method
        plan = make_plan()
        if self.ctx.enabled:  # distinct augmentation draws per process
            torch.manual_seed(seed + 1_000_003 * self.ctx.rank)
        current = self.state["current"]
        if current is not None and current["run"] != run_id:
            current = None
        if current is not None:
            for name, module in plan.modules.items():
                module.load_state_dict(current["modules"][name])
            rngs = current["rng"]
            if len(rngs) == self.ctx.world_size:
                set_rng_state(rngs[self.ctx.rank])
            else:
                self._log(
                    f"resuming {run_id} on {self.ctx.world_size} process(es), saved from "
                    f"{len(rngs)}: augmentation draws restart, so its numbers will differ "
                    "from an uninterrupted run"
                )

        for index, stage in enumerate(plan.stages):
            resume = None
            if current is not None:
                if index < current["stage_index"]:
                    continue
                if index == current["stage_index"]:
                    resume = current["training"]
            if stage.config.epochs == 0 or (resume and resume["epoch"] >= stage.config.epochs):
                continue
            if plan.student in stage.train_modules and stage.trains_classifier:
                stage.evaluate = functools.partial(self._evaluate, plan.student)
            loader, _ = make_loaders(
                self.splits, self.config.batch_size, seed * 1000 + index, self.ctx, self.config.num_workers
            )
            self.trainer.fit(
                stage,
                loader,
                resume=resume,
                on_epoch_end=functools.partial(self._end_of_epoch, run_id, method, seed, index, plan),
            )

        return self._finish(run_id, method, seed, plan.student, keep_weights)

    def _finish(
        self,
        run_id: str,
        method: str,
        seed: int | None,
        model: nn.Module,
        keep_weights: bool,
        loaded_from: Path | None = None,
    ) -> nn.Module:
        """Evaluate a finished run's model (trained, or loaded from
        ``loaded_from``), record the result and save the model."""
        result = {
            "run": run_id,
            "method": method,
            "seed": seed,
            "test_acc": self._evaluate(model)["test_acc"],
            "stage_times": self._stage_times(run_id),
        }
        if loaded_from is not None:
            result["loaded_from"] = str(loaded_from)
        self.state["finished"][run_id] = result
        self.state["current"] = None
        weights = cpu_state_dict(model)
        if keep_weights:
            self.state["weights"][run_id] = weights
        if self.ctx.is_main:
            # The model file first: once the checkpoint says finished, a resume
            # skips this run and its weights are nowhere else.
            atomic_save(weights, model_path(self.out, run_id))
            self._save()
            done = f"loaded {run_id} from {loaded_from}" if loaded_from else f"finished {run_id}"
            self._log(f"{done}: test accuracy {100 * result['test_acc']:.2f}%")
        return model

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"test_acc": accuracy(model, self.test_loader, self.trainer, context=self.ctx)}

    def _end_of_epoch(
        self,
        run_id: str,
        method: str,
        seed: int,
        stage_index: int,
        plan: MethodPlan,
        metrics: dict[str, Any],
        training: dict[str, Any],
    ) -> None:
        record = {"run": run_id, "method": method, "seed": seed, **metrics}
        self.state["history"].append(record)
        self.state["current"] = {
            "run": run_id,
            "stage_index": stage_index,
            "modules": {name: module.state_dict() for name, module in plan.modules.items()},
            "training": training,
            "rng": gather_rng_states(self.ctx),
        }
        if self.ctx.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self._save()
        self.ctx.barrier()  # nobody runs ahead of a checkpoint
        if self.on_epoch_end is not None:
            self.on_epoch_end(record)

    def _stage_times(self, run_id: str) -> dict[str, float]:
        times: dict[str, float] = defaultdict(float)
        for record in self.state["history"]:
            if record["run"] == run_id:
                times[record["stage"]] += record["time"]
        return dict(times)

    def _save(self) -> None:
        atomic_save(self.state, self.out / CHECKPOINT)

    # ------------------------------------------------------------------ report

    def _report(self, seconds: float) -> dict[str, Any]:
        runs = list(self.state["finished"].values())
        rows = summarise(runs)
        table = markdown_table(rows)
        # Epoch times come from the checkpointed history, so they add up over
        # every invocation of a resumed run; the wall time is this one's.
        training = sum(record["time"] for record in self.state["history"])
        results = {"rows": rows, "runs": runs, "training_time_s": training, "wall_time_s": seconds}
        if self.ctx.is_main:
            (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            (self.out / "results.md").write_text(table + "\n")
            plot_loss_curves(self.state["history"], self.out / "loss_curves.png")
            plot_accuracy(rows, self.out / "accuracy.png")
            self._log("\n" + table)
            self._log(
                f"\n{len(runs)} runs, {training:.0f}s of training ({seconds:.0f}s in this "
                f"invocation); outputs in {self.out}/"
            )
        return results


def _load_state(path: Path) -> dict[str, Any]:
    """The checkpoint the runner wrote at ``path``; a ConfigError naming the
    file when it holds anything else."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not _STATE_KEYS <= state.keys():
        raise ConfigError(
            f"{path} is not a checkpoint written by srm-ext distill; pass --overwrite to "
            "replace it or choose another --output-dir"
        )
    if state["format"] != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} was written by an incompatible version")
    _check_saved_config(state["config"], path)
    return state


def _fingerprint_survives_a_move(state: dict[str, Any]) -> bool:
    """Whether a resumed run's checkpoint can tell its data at another
    --data-path: its dataset fingerprint names files by their path in the tree."""
    return "format" in state.get("dataset", {})


def _check_saved_config(config: Any, path: Path) -> None:
    if not isinstance(config, dict):
        raise ConfigError(
            f"{path} is malformed: the run config must be a dict of settings, "
            f"got a {type(config).__name__}"
        )
    try:
        ExperimentConfig.from_dict({**ExperimentConfig().to_dict(), **config})
    except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
        raise ConfigError(f"{path} is malformed: {exc}") from None


def run_experiment(config: ExperimentConfig, **kwargs: Any) -> dict[str, Any]:
    """Shorthand for ``ExperimentRunner(config, **kwargs).run()``."""
    return ExperimentRunner(config, **kwargs).run()
