"""Resumable training of :class:`~srm_ext.distill.SRMDistiller` from Python.

One file holds a whole distillation: the weights of the student and the SRM
blocks with the layer pairs and k they were trained for, and per stage its
settings, the trainer's (mixed precision, accumulation, clipping) and the
distiller's it computes with (k, loss weights, KD temperature and alpha), the
metrics of every finished epoch and the optimiser/scheduler state, plus every
process's RNG state. The teacher never changes, so the file keeps a SHA-256
digest of its state rather than a copy, and a run is only resumed with the
teacher it started with. It is rewritten atomically after each epoch, so an
interrupted script that calls the same ``fit_*`` methods with the same
``checkpoint=`` path again skips the finished stages, continues the
interrupted one at its next epoch and ends with the weights an uninterrupted
run would have. A loader that shuffles with its own ``generator`` has that
generator's state saved and restored too. Weights and digest are those of the
plain models, so a run resumes whether or not either model is compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_save, gather_rng_states, load_checkpoint, set_rng_state
from .config import StageConfig
from .hooks import unwrap, wrapper_prefix
from .trainer import Trainer, loader_samplers

__all__ = ["DistillerCheckpoint"]

_FORMAT = "srm_ext.SRMDistiller.v2"
_OLDER_FORMATS = ("srm_ext.SRMDistiller.v1",)
# The distiller's state_dict keys of its teacher, which the file leaves out,
# and of its student.
_TEACHER_PREFIX = "teacher."
_STUDENT_PREFIX = "student."


def _loader_generator(loader: Iterable) -> torch.Generator | None:
    # DataLoader(generator=g) draws its shuffle order and worker seeds from g;
    # a sampler given its own generator (directly or inside a batch_sampler)
    # draws the order from that one.
    for owner in (loader, *loader_samplers(loader)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            return generator
    return None


def teacher_digest(teacher: nn.Module) -> str:
    """SHA-256 of a module's state: every tensor's name, dtype, shape and bytes.
    A module's extra state (any object) counts by name and type only: its
    printed form need not be the same in two processes."""
    digest = hashlib.sha256()
    for name, value in teacher.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{name}:{type(value).__qualname__};".encode())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    # Tuples come back from a checkpoint as lists or tuples alike; compare as lists.
    return list(value) if isinstance(value, tuple) else value


class DistillerCheckpoint:
    """The checkpoint file at ``path``; read on creation if it exists."""

    def __init__(self, path: str | os.PathLike, trainer: Trainer) -> None:
        self.path = Path(path)
        self.context = trainer.context
        self.trainer_settings = trainer.settings
        self._teacher_digest: str | None = None
        if self.path.exists():
            self.state = load_checkpoint(self.path)
            saved_format = self.state.get("format") if isinstance(self.state, dict) else None
            if saved_format in _OLDER_FORMATS:
                raise ValueError(
                    f"{os.fspath(self.path)} was written by an earlier srm_ext in a format "
                    "this one does not resume; pass a new path to start afresh"
                )
            if saved_format != _FORMAT:
                raise ValueError(
                    f"{os.fspath(self.path)} is not an SRMDistiller checkpoint; pass the path "
                    "that fit_* wrote, or a new one to start afresh"
                )
        else:
            self.state = {
                "format": _FORMAT, "teacher": None, "model": None, "stages": {}, "last": None,
                "rng": [],
            }

    @property
    def holds_weights(self) -> bool:
        return self.state["model"] is not None

    def restore(
        self, model: nn.Module, key: str, config: StageConfig, loader: Iterable
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Load the saved weights into ``model`` (an SRMDistiller); return stage
        ``key``'s metrics so far and the training state to resume it from (None:
        not started). A checkpoint refused for any reason leaves ``model`` as it
        was: every check comes before the weights are loaded."""
        weights = None
        if self.holds_weights:
            if self.state["teacher"] != self._digest_of_teacher(model):
                raise ValueError(
                    f"{os.fspath(self.path)} was written with another teacher: its weights "
                    "differ from this distiller's; load the teacher that run started with, "
                    "or pass a new path to start afresh"
                )
            self._check_layout(model)
            weights = _with_student_wrappers(self.state["model"], model)
            mismatch = _state_mismatch(weights, model)
            if mismatch:
                raise ValueError(
                    f"{os.fspath(self.path)} was written for other models or layer pairs "
                    f"than this distiller's: {mismatch}"
                )
        progress = self.state["stages"].get(key)
        if progress is not None:
            self._check_settings(progress, model, key, config)
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        if progress is None:
            return [], None
        # The last stage to write also left the RNG state its next epoch starts from.
        if self.state["last"] == key:
            rngs = self.state["rng"]
            if len(rngs) == self.context.world_size:
                set_rng_state(rngs[self.context.rank])
                generator = _loader_generator(loader)
                if generator is not None and "loader" in rngs[self.context.rank]:
                    generator.set_state(rngs[self.context.rank]["loader"])
                if getattr(loader, "persistent_workers", False):
                    warnings.warn(
                        f"resuming from {os.fspath(self.path)} with a loader that keeps "
                        "persistent workers: their random state is not saved, so random "
                        "numbers drawn in the dataset (augmentation) restart from new worker "
                        "seeds and the result will differ from an uninterrupted run; "
                        "persistent_workers=False makes it exact",
                        stacklevel=4,
                    )
            else:
                warnings.warn(
                    f"{os.fspath(self.path)} was saved by {len(rngs)} process(es), resumed on "
                    f"{self.context.world_size}: data order and augmentation restart, so the "
                    "result will differ from an uninterrupted run",
                    stacklevel=4,
                )
        return list(progress["history"]), progress["training"]

    def stage_config(self, key: str) -> StageConfig | None:
        """The settings stage ``key`` was saved with, or None if it was not."""
        progress = self.state["stages"].get(key)
        if progress is None:
            return None
        names = {field.name for field in dataclasses.fields(StageConfig)}
        return StageConfig(**{n: v for n, v in progress["config"].items() if n in names})

    def _check_layout(self, model: nn.Module) -> None:
        """The weights resume only into the layer pairs, and the k per pair, they
        were trained for: other pairs of the same channel counts, or another k,
        would load them without a shape to tell."""
        saved = self.state.get("layout")
        if not isinstance(saved, dict):  # written before the layout was saved
            return
        current = _layout(model)
        if saved.get("layer_pairs") != current["layer_pairs"]:
            raise ValueError(
                f"{os.fspath(self.path)} was written for the layer pairs "
                f"{_pairs_text(saved.get('layer_pairs') or [])}, this distiller pairs "
                f"{_pairs_text(current['layer_pairs'])}; pass the same pairs to resume, "
                "or another path to start afresh"
            )
        if saved.get("sparsity") != current["sparsity"]:
            raise ValueError(
                f"{os.fspath(self.path)} was written with k={saved.get('sparsity')} codewords kept "
                f"per pixel, this distiller keeps k={current['sparsity']}: pass the "
                "sparsity_multiplier that run used to resume it, or another path to start afresh"
            )

    def _check_settings(
        self, progress: dict[str, Any], model: nn.Module, key: str, config: StageConfig
    ) -> None:
        """Stage ``key`` resumes only with the settings it was checkpointed with."""
        saved, wanted = progress["config"], dataclasses.asdict(config)
        changed = [name for name in wanted if _plain(saved.get(name)) != _plain(wanted[name])]
        # Files written before the trainer's or the distiller's settings were
        # saved cannot be checked for them.
        changes = [f"{n}={saved.get(n)!r} -> {wanted[n]!r}" for n in changed]
        for owner, current in (
            ("trainer", self.trainer_settings), ("distiller", model.stage_settings(key))
        ):
            recorded = progress.get(owner, current)
            changes += [
                f"{owner} {n}={recorded.get(n)!r} -> {value!r}"
                for n, value in current.items()
                if _plain(recorded.get(n)) != _plain(value)
            ]
        if changes:
            details = ", ".join(changes)
            raise ValueError(
                f"{os.fspath(self.path)}: stage {key!r} was checkpointed with other settings "
                f"({details}); pass the same ones to resume it, or another path to start afresh"
            )

    def save_epoch(
        self,
        model: nn.Module,
        key: str,
        config: StageConfig,
        history: list[dict[str, Any]],
        training: dict[str, Any],
        loader: Iterable,
    ) -> None:
        """Record a finished epoch of stage ``key`` (on every process; the main
        one writes the file, the others wait for it)."""
        self.state["teacher"] = self._digest_of_teacher(model)
        self.state["model"] = _plain_state(model)
        self.state["layout"] = _layout(model)
        self.state["stages"][key] = {
            "config": dataclasses.asdict(config),
            "trainer": self.trainer_settings,
            "distiller": model.stage_settings(key),
            "history": list(history),
            "training": training,
        }
        self.state["last"] = key
        generator = _loader_generator(loader)
        extra = {} if generator is None else {"loader": generator.get_state()}
        self.state["rng"] = gather_rng_states(self.context, extra)
        if self.context.is_main:
            atomic_save(self.state, self.path)
        self.context.barrier()

    def _digest_of_teacher(self, model: nn.Module) -> str:
        # Computed once: the teacher is frozen while the distiller trains.
        if self._teacher_digest is None:
            self._teacher_digest = teacher_digest(unwrap(model.teacher))
        return self._teacher_digest


def _layout(model: nn.Module) -> dict[str, list]:
    """What the weights were trained for beside their shapes: the pairs by the
    plain models' paths, which a compile wrapper or an alias does not change."""
    pairs = zip(model.teacher_tap.plain_paths(), model.student_tap.plain_paths())
    return {
        "layer_pairs": [list(pair) for pair in pairs],
        "sparsity": [rep.sparsity for rep in model.representations],
    }


def _pairs_text(pairs: list[list[str]]) -> str:
    return ", ".join(f"{t_path} -> {s_path}" for t_path, s_path in pairs)


def _plain_state(model: nn.Module) -> dict[str, Any]:
    """The distiller's state without its teacher, with the student's keys those
    of the plain model (no ``_orig_mod.`` from a torch.compile wrapper)."""
    wrapped = _STUDENT_PREFIX + wrapper_prefix(model.student)
    return {
        _STUDENT_PREFIX + name[len(wrapped):] if name.startswith(wrapped) else name: value
        for name, value in model.state_dict().items()
        if not name.startswith(_TEACHER_PREFIX)
    }


def _state_mismatch(weights: dict[str, Any], model: nn.Module) -> str:
    """How ``weights`` fail to fit ``model`` (the teacher's own aside, which the
    checkpoint does not hold), or "" where they fit."""
    current = model.state_dict()
    missing = [n for n in current if n not in weights and not n.startswith(_TEACHER_PREFIX)]
    unexpected = [n for n in weights if n not in current]
    reshaped = [
        f"{n} {tuple(weights[n].shape)} -> {tuple(current[n].shape)}"
        for n in weights
        if n in current and tuple(weights[n].shape) != tuple(current[n].shape)
    ]
    problems = [
        f"{what} {names}"
        for what, names in (
            ("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", reshaped)
        )
        if names
    ]
    return "; ".join(problems)


def _with_student_wrappers(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``state`` (from :func:`_plain_state`) keyed for ``model``'s student as it is wrapped."""
    wrapped = _STUDENT_PREFIX + wrapper_prefix(model.student)
    return {
        wrapped + name[len(_STUDENT_PREFIX):] if name.startswith(_STUDENT_PREFIX) else name: value
        for name, value in state.items()
    }
