"""SRM distillation of a teacher CNN into a student CNN, on the user's own models."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import as_float, as_int, check_loss_weight
from ..modules import SparseCodePredictor, SparseRepresentation, check_multipliers, srm_sizes
from .config import StageConfig
from .distiller_checkpoint import DistillerCheckpoint
from .hooks import (
    FeatureTap,
    check_runs_hooks,
    eval_mode,
    parameters_except,
    unwrap,
    wrapped_module,
)
from .losses import check_logits, check_same_classes, kd_loss
from .metrics import accuracy, check_held_out_loader
from .placement import model_input, module_device, module_dtype
from .trainer import Stage, Trainer, image_batch

__all__ = ["SRMDistiller", "DEFAULT_STAGE_CONFIGS"]

#: Defaults per stage: the SRM authors' CIFAR schedule, Adam at lr 1e-3, then
#: 1e-4, then 1e-5, split as their 10/60/30 epochs (dictionaries), 30/100/30
#: (stage 2) and 30/100/70 (stage 3) at any number of epochs. The epoch counts
#: are short defaults; the authors ran 100, 160 and 200. The dictionaries get
#: no weight decay, as theirs: it would shrink the codewords the
#: reconstruction needs.
DEFAULT_STAGE_CONFIGS: dict[str, StageConfig] = {
    "dictionary": StageConfig(epochs=10, weight_decay=0.0, milestones=(0.1, 0.7)),
    "init": StageConfig(epochs=10, milestones=(30 / 160, 130 / 160)),
    "kd": StageConfig(epochs=30),
}

LayerPairs = Mapping[str, str] | Sequence[tuple[str, str]]
#: A stage's settings in full, or a mapping of those to change from its defaults.
StageSettings = StageConfig | Mapping[str, Any]


def _stage_config(key: str, settings: StageSettings | None) -> StageConfig:
    """The settings of stage ``key``: ``settings`` when a :class:`StageConfig`,
    else the stage's defaults with the changes a mapping gives."""
    if isinstance(settings, StageConfig):
        return settings
    if settings is None:
        # A copy: a stage's config may be changed, the defaults must not be.
        return DEFAULT_STAGE_CONFIGS[key].replace()
    if isinstance(settings, Mapping):
        return DEFAULT_STAGE_CONFIGS[key].replace(**settings)
    raise TypeError(
        f"a stage config must be a StageConfig or a mapping of settings to change, "
        f"got {type(settings).__name__}"
    )


class SRMDistiller(nn.Module):
    """Sparse Representation Matching between ``teacher`` and ``student``.

    Args:
        teacher: a trained classifier returning logits; it is never updated.
        student: the classifier to train; returned without SRM blocks or hooks by
            :meth:`export_student`. Either model may be compiled (``model.compile()``
            or ``torch.compile(model)``; paths are those of the plain model) or
            wrapped in DistributedDataParallel, which is dropped: the trainer
            averages gradients across processes itself.
        layer_pairs: teacher module path -> student module path (dotted names as in
            ``named_modules()``), e.g. ``{"layer2": "stage2", "layer3.1": "stage3"}``,
            or a list of ``(teacher path, student path)`` pairs. Both modules must
            output 4-D (N, C, H, W) maps; the grids may differ. A path may appear in
            several pairs (each pair gets its own SRM blocks), but a pair only once.
            The per-pair losses are logged as ``recon/{teacher path}`` (stage 1) and
            ``srm/{student path}`` (stage 2), or as ``recon/{teacher}->{student}``
            and ``srm/{teacher}->{student}`` where that path is shared by pairs.
        codeword_multiplier, sparsity_multiplier: per pair with teacher channels D,
            ``K = int(D * cm)`` codewords and ``k = max(1, int(D * sm * cm))`` kept.
        input_shape: (C, H, W) of one input, or ``example_input`` (a batch): used for
            a dry forward pass that finds the channel counts. When both are omitted
            the first batch of the first ``fit_*`` call is used, or the shapes in a
            state dict loaded before it.
        local_weight, global_weight: weights of the pixel- and image-level losses.
        kd_temperature, kd_alpha: Hinton KD of stage 3.

    Stages (each returns the per-epoch metrics)::

        distiller = SRMDistiller(teacher, student, {"layer2": "stage2"}, input_shape=(3, 32, 32))
        distiller.fit_dictionaries(loader, epochs=10)  # stage 1: teacher dictionaries
        distiller.fit_student(loader, epochs=10)       # stage 2: student + predictors
        distiller.fit_kd(loader, epochs=30)            # stage 3: Hinton KD
        student = distiller.export_student()
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        layer_pairs: LayerPairs,
        codeword_multiplier: float = 2.0,
        sparsity_multiplier: float = 0.02,
        *,
        input_shape: Sequence[int] | None = None,
        example_input: Tensor | None = None,
        local_weight: float = 1.0,
        global_weight: float = 1.0,
        kd_temperature: float = 4.0,
        kd_alpha: float = 0.9,
    ) -> None:
        super().__init__()
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{role} must be an nn.Module, got {type(model).__name__}")
            check_runs_hooks(unwrap(model), role)
        if isinstance(layer_pairs, str) or not isinstance(layer_pairs, Iterable):
            raise TypeError(
                "layer_pairs must map teacher paths to student paths: a dict or "
                f"(teacher_path, student_path) pairs, got {type(layer_pairs).__name__}"
            )
        pairs = list(layer_pairs.items() if isinstance(layer_pairs, Mapping) else layer_pairs)
        if not pairs:
            raise ValueError("layer_pairs is empty; give at least one teacher -> student pair")
        for pair in pairs:
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(
                    "layer_pairs must map teacher paths to student paths: a dict or "
                    f"(teacher_path, student_path) pairs, got the entry {pair!r}"
                )
        teacher = _without_data_parallel(teacher, "teacher")
        student = _without_data_parallel(student, "student")
        _check_separate(teacher, student)
        self.teacher = teacher
        self.student = student
        self.layer_pairs: list[tuple[str, str]] = [(str(t), str(s)) for t, s in pairs]
        repeated = [pair for pair, count in Counter(self.layer_pairs).items() if count > 1]
        if repeated:
            t_path, s_path = repeated[0]
            raise ValueError(f"layer pair {t_path!r} -> {s_path!r} is given more than once")
        # One metric name per pair, so that pairs sharing a path stay apart.
        self._recon_names = _pair_names(self.layer_pairs, "recon", side=0)
        self._srm_names = _pair_names(self.layer_pairs, "srm", side=1)
        _check_hyperparameters(
            codeword_multiplier=codeword_multiplier,
            sparsity_multiplier=sparsity_multiplier,
            local_weight=local_weight,
            global_weight=global_weight,
            kd_temperature=kd_temperature,
            kd_alpha=kd_alpha,
        )
        self.codeword_multiplier = codeword_multiplier
        self.sparsity_multiplier = sparsity_multiplier
        self.local_weight = local_weight
        self.global_weight = global_weight
        self.kd_temperature = kd_temperature
        self.kd_alpha = kd_alpha
        self._warned_without_gradient: set[str] = set()  # student paths
        _check_placement(teacher, student)
        # Validates the paths now, so a typo fails before any training.
        self.teacher_tap = FeatureTap(teacher, [t for t, _ in self.layer_pairs], role="teacher")
        self.student_tap = FeatureTap(student, [s for _, s in self.layer_pairs], role="student")
        self.representations = nn.ModuleList()
        self.predictors = nn.ModuleList()
        # A few values of each dictionary as built, to tell whether stage 1 ran
        # (or fitted ones were loaded) before stage 2 uses their codes.
        self._initial_fingerprints: list[Tensor | None] = []
        # Blocks sized on the meta device have no initial values to compare
        # with: there, only a stage-1 run or a load of saved ones counts.
        self._dictionaries_fitted_or_loaded = False
        # Student parameters that no tapped map depends on, which stage 2 does
        # not train; None until a batch has shown which they are.
        self._student_parameters_off_the_maps: set[str] | None = None
        # The models' logits per sample, once the dry run has shown them.
        self._num_classes: int | None = None
        # The models' shared dtype while a stage trains, looked up once for
        # its batches; None otherwise, where each call looks it up.
        self._stage_dtype: torch.dtype | None = None
        if example_input is None and input_shape is not None:
            example_input = torch.zeros(2, *_input_shape(input_shape))
        if example_input is not None:
            self.build(example_input)

    # ------------------------------------------------------------------ setup

    @property
    def is_built(self) -> bool:
        return len(self.representations) == len(self.layer_pairs)

    @torch.no_grad()
    def build(self, example_input: Tensor) -> None:
        """Create the SRM blocks from a dry forward pass of both models on
        ``example_input``: a batch as the models take it (after any
        preprocessing); only its first two samples are used."""
        if self.is_built:
            return
        if not isinstance(example_input, Tensor):
            raise TypeError(
                "example_input must be a batch of inputs (a Tensor), got "
                f"{type(example_input).__name__}"
            )
        batch = self._dry_run_batch(example_input)
        t_maps, t_out = self.teacher_tap.probe(batch, return_output=True)
        s_maps, s_out = self.student_tap.probe(batch, return_output=True)
        # Stage 3 needs logits: say so now, not after stages 1 and 2 have trained;
        # in train mode too, where some students return more (auxiliary logits).
        teacher_logits = check_logits(t_out, "teacher", len(batch))
        check_same_classes(check_logits(s_out, "student", len(batch)), teacher_logits)
        train_logits = check_logits(
            self.student_tap.train_mode_output(batch), "student in train mode", len(batch)
        )
        check_same_classes(train_logits, teacher_logits)
        self._num_classes = teacher_logits.shape[1]
        self._add_blocks(
            [(t_maps[t].shape[1], s_maps[s].shape[1]) for t, s in self.layer_pairs],
            batch.device,
        )
        self._student_parameters_off_the_maps = self.student_tap.parameters_off_the_maps(batch)

    def _dry_run_batch(self, example_input: Tensor) -> Tensor:
        """Two samples of ``example_input`` where the models are, in their dtype."""
        return model_input(example_input[:2].to(module_device(self.teacher)), self.teacher)

    def _add_blocks(self, channels: list[tuple[int, int]], device: torch.device) -> None:
        """The SRM blocks of every pair from its (teacher, student) channel counts."""
        representations, predictors = [], []
        for (t_path, s_path), (t_channels, s_channels) in zip(self.layer_pairs, channels):
            try:
                num_codewords, sparsity = srm_sizes(
                    t_channels, self.codeword_multiplier, self.sparsity_multiplier
                )
            except ValueError as exc:
                raise ValueError(f"layer pair {t_path!r} -> {s_path!r}: {exc}") from None
            representations.append(SparseRepresentation(t_channels, num_codewords, sparsity))
            predictors.append(
                SparseCodePredictor(s_channels, num_codewords, self.local_weight, self.global_weight)
            )
        # Added only once every pair has its blocks: a pair refused above
        # leaves the distiller unbuilt, not half built.
        self.representations.extend(representations)
        self.predictors.extend(predictors)
        self.representations.to(device, _block_dtype(self.teacher))
        self.predictors.to(device, _block_dtype(self.student))
        self._initial_fingerprints = [_fingerprint(rep) for rep in self.representations]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A distiller left to build itself from its first batch has no blocks
        # yet: size them from the saved dictionaries (their channel counts), as
        # lazy modules do, so that a saved distiller loads without a dry run.
        if not self.is_built:
            shapes = [
                tuple(state_dict.get(f"{prefix}{kind}.{i}.dictionary", torch.empty(0)).shape)
                for i in range(len(self.layer_pairs))
                for kind in ("representations", "predictors")
            ]
            if all(len(shape) == 2 for shape in shapes):
                self._add_blocks(
                    [(shapes[i][0], shapes[i + 1][0]) for i in range(0, len(shapes), 2)],
                    module_device(self.teacher),
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        saved = [f"{prefix}representations.{i}.dictionary" for i in range(len(self.layer_pairs))]
        if all(key in state_dict for key in saved):
            self._dictionaries_fitted_or_loaded = True

    def _ensure_built(self, loader: Iterable, trainer: Trainer) -> None:
        if not self.is_built:
            images = _first_images(loader, "the SRM blocks are sized from its first")
            self.build(self._as_trained(images, trainer))

    def _as_trained(self, images: Tensor, trainer: Trainer) -> Tensor:
        """Two samples of a loader's batch as training feeds them to the models:
        on their device, through the trainer's preprocess (its eval form, which
        draws no augmentation)."""
        images = images[:2].to(module_device(self.teacher))
        if trainer.preprocess is not None:
            images = trainer.preprocess(images, False)
        return images

    def _ensure_dry_run_facts(self, loader: Iterable, key: str, trainer: Trainer) -> None:
        """What only a dry run shows, where blocks were loaded from a state dict
        or none were built for stage 3: the class count, which every batch's
        targets are checked against, and for stage 2 the student's layers up to
        its tapped maps. One draw of the loader's first batch gives both."""
        needs_classes = self._num_classes is None
        needs_trained_layers = key == "init" and self._student_parameters_off_the_maps is None
        if not (needs_classes or needs_trained_layers):
            return
        why = (
            "stage 2 finds the student's trained layers on its first"
            if needs_trained_layers
            else "the targets are checked against the teacher's logits on its first"
        )
        try:
            images = _first_images(loader, why)
        except ValueError:
            if needs_trained_layers:
                raise
            # One-shot or empty: a one-shot iterator keeps its first batch for
            # training, and stage 3 counts the classes from it instead.
            return
        batch = self._dry_run_batch(self._as_trained(images, trainer))
        if needs_classes:
            # Eagerly, as the build's dry run: a compiled teacher is not
            # compiled again for two samples.
            with torch.no_grad():
                _, output = self.teacher_tap.probe(batch, return_output=True)
            self._num_classes = check_logits(output, "teacher", len(batch)).shape[1]
        if needs_trained_layers:
            self._student_parameters_off_the_maps = self.student_tap.parameters_off_the_maps(batch)

    # ------------------------------------------------------------------ objectives

    def dictionary_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Stage 1: reconstruction loss of the teacher's maps, summed over pairs."""
        # The frozen teacher runs in eval mode, as the stages run it, also when
        # an objective is called on its own.
        with torch.no_grad(), eval_mode(self.teacher), self.teacher_tap.capture() as t_maps:
            self.teacher(model_input(images, self.teacher, self._stage_dtype))
        losses = {
            name: block.loss(t_maps[t_path])
            for name, (t_path, _), block in zip(
                self._recon_names, self.layer_pairs, self.representations
            )
        }
        return sum(losses.values()), losses

    @torch.no_grad()
    def teacher_labels(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Stage-2 targets (pixel labels, image labels) per layer pair."""
        with eval_mode(self.teacher), self.teacher_tap.capture() as t_maps:
            self.teacher(model_input(images, self.teacher, self._stage_dtype))
        return [
            tuple(block.labels(t_maps[t_path]))
            for (t_path, _), block in zip(self.layer_pairs, self.representations)
        ]

    def student_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Stage 2: the student's sparse-code prediction loss, summed over pairs."""
        labels = self.teacher_labels(images)
        with self.student_tap.capture() as s_maps:
            self.student(model_input(images, self.student, self._stage_dtype))
        if torch.is_grad_enabled():
            self._warn_of_maps_without_gradient(s_maps)
        losses = {
            name: predictor(s_maps[s_path], target)
            for name, (_, s_path), predictor, target in zip(
                self._srm_names, self.layer_pairs, self.predictors, labels
            )
        }
        return sum(losses.values()), losses

    def _warn_of_maps_without_gradient(self, s_maps: Mapping[str, Tensor]) -> None:
        """Stage 2 trains the student through its tapped maps. One that carries
        no gradient leaves the student as it was while the loss still falls
        (the predictors learn): say so, once per path."""
        for _, s_path in self.layer_pairs:
            if s_path not in self._warned_without_gradient and not s_maps[s_path].requires_grad:
                self._warned_without_gradient.add(s_path)
                warnings.warn(
                    f"the student's map at {s_path!r} carries no gradient, so stage 2 trains "
                    "only its predictor, not the student; is it computed under torch.no_grad, "
                    "by frozen layers only, or inside torch.utils.checkpoint with "
                    "use_reentrant=True (a module within the checkpointed segment, or a "
                    "segment whose inputs carry none, such as the images; use "
                    "use_reentrant=False)?",
                    stacklevel=2,
                )

    def kd_loss(self, images: Tensor, targets: Tensor) -> Tensor:
        """Stage 3: Hinton KD from the teacher's logits."""
        self._check_targets(targets)
        return self._kd_objective(images, targets)

    def _kd_objective(self, images: Tensor, targets: Tensor) -> Tensor:
        images = model_input(images, self.student, self._stage_dtype)  # the teacher's too
        with torch.no_grad(), eval_mode(self.teacher):
            teacher_logits = self.teacher(images)
        if self._num_classes is None:
            # A one-shot loader's: the later batches' targets are checked.
            self._num_classes = teacher_logits.shape[1]
        return kd_loss(
            self.student(images), teacher_logits, targets, self.kd_temperature, self.kd_alpha
        )

    def _check_targets(self, targets: Tensor) -> None:
        """Targets must be over the models' classes. Every stage checks them, so
        that a loader whose targets stage 3 cannot take is refused on its first
        batch, not after two stages have trained. Class indices are checked on
        the CPU only: on a GPU the check would wait for the batch."""
        classes = self._num_classes
        if classes is None:
            return
        if targets.dim() == 2 and targets.shape[1] != classes:
            raise ValueError(
                f"the loader's targets are class probabilities over {targets.shape[1]} "
                f"classes, but the models give logits over {classes}"
            )
        if targets.dim() == 1 and targets.device.type == "cpu" and targets.numel():
            outside = targets[(targets < 0) | (targets >= classes)]
            if outside.numel():
                raise ValueError(
                    f"the loader's targets hold class index {outside[0].item()}, but the "
                    f"models give logits over {classes} classes (indices 0 to {classes - 1})"
                )

    # ------------------------------------------------------------------ stages

    def dictionary_stage(self, config: StageConfig) -> Stage:
        return Stage(
            name="srm-dictionary",
            objective=lambda images, targets: self.dictionary_loss(images),
            parameters=list(self.representations.parameters()),
            train_modules=[self.representations],
            frozen_modules=[self.teacher],
            config=config,
            trains_classifier=False,
            check_targets=self._check_targets,
        )

    def student_stage(self, config: StageConfig) -> Stage:
        trained = parameters_except(self.student, self._student_parameters_off_the_maps or set())
        return Stage(
            name="srm-init",
            objective=lambda images, targets: self.student_loss(images),
            # The layers after the tapped maps (the classifier) get no gradient:
            # left out, so that weight decay leaves them as it does in eager mode.
            parameters=[*trained, *self.predictors.parameters()],
            train_modules=[self.student, self.predictors],
            frozen_modules=[self.teacher, self.representations],
            config=config,
            trains_classifier=False,
            check_targets=self._check_targets,
        )

    def kd_stage(self, config: StageConfig) -> Stage:
        return Stage(
            name="srm-kd",
            objective=self._kd_objective,
            parameters=list(self.student.parameters()),
            train_modules=[self.student],
            frozen_modules=[self.teacher],
            config=config,
            check_targets=self._check_targets,
        )

    def stages(self, configs: Mapping[str, StageSettings] | None = None) -> list[Stage]:
        """The three stages in order, with ``configs`` overriding the defaults per
        key (``dictionary``, ``init``, ``kd``), each a :class:`StageConfig` or a
        mapping of the settings to change. The blocks must be built."""
        if not self.is_built:
            raise RuntimeError("build the SRM blocks first (input_shape, example_input or build())")
        configs = dict(configs or {})
        unknown = sorted(set(configs) - set(DEFAULT_STAGE_CONFIGS))
        if unknown:
            raise ValueError(
                f"unknown stage(s) {', '.join(map(repr, unknown))}; the stages are "
                f"{', '.join(DEFAULT_STAGE_CONFIGS)}"
            )
        return [
            self.dictionary_stage(_stage_config("dictionary", configs.get("dictionary"))),
            self.student_stage(_stage_config("init", configs.get("init"))),
            self.kd_stage(_stage_config("kd", configs.get("kd"))),
        ]

    def fit_dictionaries(self, loader: Iterable, epochs: int | None = None, **kwargs: Any) -> list[dict]:
        """Stage 1: fit the teacher-side dictionaries (teacher frozen, eval mode)."""
        return self._fit(
            self.dictionary_stage, "dictionary", loader, epochs, needs_blocks=True, **kwargs
        )

    def fit_student(self, loader: Iterable, epochs: int | None = None, **kwargs: Any) -> list[dict]:
        """Stage 2: train the whole student and its predictors on the teacher's sparse codes."""
        return self._fit(self.student_stage, "init", loader, epochs, needs_blocks=True, **kwargs)

    def fit_kd(self, loader: Iterable, epochs: int | None = None, **kwargs: Any) -> list[dict]:
        """Stage 3: Hinton KD of the student (predictor blocks unused)."""
        return self._fit(self.kd_stage, "kd", loader, epochs, **kwargs)

    def fit(
        self,
        loader: Iterable,
        dictionary_epochs: int | None = None,
        init_epochs: int | None = None,
        kd_epochs: int | None = None,
        *,
        epochs: int | None = None,
        **kwargs: Any,
    ) -> dict[str, list[dict]]:
        """All three stages; returns the metrics of each. ``epochs`` is every
        stage's epoch count where its own (``dictionary_epochs`` and so on) is
        not given."""

        def count(own: int | None) -> int | None:
            return epochs if own is None else own

        return {
            "dictionary": self.fit_dictionaries(loader, count(dictionary_epochs), **kwargs),
            "init": self.fit_student(loader, count(init_epochs), **kwargs),
            "kd": self.fit_kd(loader, count(kd_epochs), **kwargs),
        }

    def stage_settings(self, key: str) -> dict[str, Any]:
        """The distiller's settings that stage ``key`` (dictionary, init or
        kd) computes with beside its StageConfig; a resumed stage must keep them."""
        if key == "kd":
            return {"kd_temperature": self.kd_temperature, "kd_alpha": self.kd_alpha}
        settings: dict[str, Any] = {"sparsity": [rep.sparsity for rep in self.representations]}
        if key == "init":
            settings["local_weight"] = [pred.local_weight for pred in self.predictors]
            settings["global_weight"] = [pred.global_weight for pred in self.predictors]
        return settings

    def _dictionaries_untrained(self) -> bool:
        if not self.is_built:
            return True
        if any(initial is None for initial in self._initial_fingerprints):  # sized on meta
            return not self._dictionaries_fitted_or_loaded
        current = [_fingerprint(rep) for rep in self.representations]
        return all(
            now is not None and torch.equal(now, initial)
            for now, initial in zip(current, self._initial_fingerprints)
        )

    def _fit(
        self,
        make_stage: Callable[[StageConfig], Stage],
        key: str,
        loader: Iterable,
        epochs: int | None,
        *,
        needs_blocks: bool = False,
        config: StageSettings | None = None,
        trainer: Trainer | None = None,
        eval_loader: Iterable | None = None,
        checkpoint: str | os.PathLike | None = None,
        **trainer_kwargs: Any,
    ) -> list[dict]:
        """Shared by the ``fit_*`` methods: ``config`` replaces the stage's default
        settings (a :class:`StageConfig`) or changes some of them (a mapping such
        as ``{"lr": 3e-4}``), ``epochs`` overrides its epoch count; ``trainer`` or keyword
        arguments of :class:`Trainer` (not both) say how to run; ``eval_loader``
        adds the student's held-out accuracy to the metrics of stage 3 (under
        torch.distributed over the union of the processes' loaders, which may be
        shards of the held-out set, drawn without padding or by torch's
        DistributedSampler, whose padding is not counted, or each the whole of it).
        ``checkpoint``: a file rewritten after every epoch; if it exists, the
        distiller's weights are loaded from it first, a stage it holds as finished
        is skipped and an unfinished one continues at its next epoch; without
        ``config``, a stage it holds keeps the settings it was saved with."""
        stage_fields = {field.name for field in dataclasses.fields(StageConfig)}
        stage_settings = sorted(set(trainer_kwargs) & stage_fields)
        if stage_settings:
            given = ", ".join(f"{name!r}: {trainer_kwargs[name]!r}" for name in stage_settings)
            what = "is a stage setting" if len(stage_settings) == 1 else "are stage settings"
            raise TypeError(
                f"{', '.join(stage_settings)} {what}, not a Trainer argument: pass "
                f"config={{{given}}}"
            )
        if trainer is not None and trainer_kwargs:
            # They would be silently ignored (e.g. amp="bf16" running in float32).
            names = ", ".join(sorted(trainer_kwargs))
            raise TypeError(
                f"got both trainer= and Trainer keyword arguments ({names}), which that "
                "trainer would ignore; set them on the Trainer or drop trainer="
            )
        _check_placement(self.teacher, self.student)  # either may have moved since
        if trainer is None:
            trainer_kwargs.setdefault("device", module_device(self.student))
            trainer = Trainer(**trainer_kwargs)
        if needs_blocks or checkpoint is not None:
            # A checkpoint holds the blocks' weights, whichever stage wrote it.
            self._ensure_built(loader, trainer)
        self._ensure_dry_run_facts(loader, key, trainer)
        # Models moved one by one (not by distiller.to) leave the blocks on
        # the old device: they follow. Their dtype stays, as the blocks cast
        # the features to it.
        self.representations.to(module_device(self.teacher))
        self.predictors.to(module_device(self.student))
        defaults_wanted = config is None
        config = _stage_config(key, config)
        if epochs is not None:
            config = config.replace(epochs=epochs)
        history: list[dict] = []
        resume = None
        saver = None
        if checkpoint is not None:
            saver = DistillerCheckpoint(checkpoint, trainer)
            saved = saver.stage_config(key) if defaults_wanted else None
            if saved is not None:
                # The defaults it started with, which another version may have changed.
                config = saved if epochs is None else saved.replace(epochs=epochs)
            history, resume = saver.restore(self, key, config, loader)
            if resume is not None and resume["epoch"] >= config.epochs:
                if trainer.log is not None:
                    trainer.log(f"{key}: finished in {os.fspath(checkpoint)}; skipped")
                return history
        if key == "init" and self._dictionaries_untrained():
            warnings.warn(
                "fit_student before fit_dictionaries: the teacher's labels come from "
                "untrained dictionaries; fit them first or load fitted ones",
                stacklevel=3,
            )
        stage = make_stage(config)
        if eval_loader is not None and stage.trains_classifier:
            check_held_out_loader(eval_loader)  # before an epoch trains, not after
            # Counts summed over processes: each may hold a shard of the held-out set.
            stage.evaluate = lambda: {
                "test_acc": accuracy(self.student, eval_loader, trainer, context=trainer.context)
            }
        self._stage_dtype = module_dtype(self.student)  # checked to be the teacher's above
        try:
            if saver is None:
                history = trainer.fit(stage, loader)
            else:

                def save_epoch(metrics: dict, training: dict) -> None:
                    history.append(metrics)
                    saver.save_epoch(self, key, config, history, training, loader)

                trainer.fit(stage, loader, resume=resume, on_epoch_end=save_epoch)
        finally:
            self._stage_dtype = None
        if key == "dictionary" and history:
            self._dictionaries_fitted_or_loaded = True
        return history

    # ------------------------------------------------------------------ export

    def export_student(self) -> nn.Module:
        """A copy of the student, in eval mode, with no SRM blocks and no hooks
        (the plain model, where a ``torch.compile`` wrapper was given)."""
        return copy.deepcopy(unwrap(self.student)).eval()


def _check_hyperparameters(
    *,
    codeword_multiplier: float,
    sparsity_multiplier: float,
    local_weight: float,
    global_weight: float,
    kd_temperature: float,
    kd_alpha: float,
) -> None:
    """Refuse values that would train on NaN or silently mean something else."""
    check_multipliers(codeword_multiplier, sparsity_multiplier)
    if not 0.0 < as_float("kd_temperature", kd_temperature) < math.inf:  # also refuses NaN
        raise ValueError(f"kd_temperature must be finite and > 0, got {kd_temperature}")
    check_loss_weight("local_weight", local_weight)
    check_loss_weight("global_weight", global_weight)
    if not 0.0 <= as_float("kd_alpha", kd_alpha) <= 1.0:
        raise ValueError(f"kd_alpha must lie in [0, 1], got {kd_alpha}")


def _without_data_parallel(model: nn.Module, role: str) -> nn.Module:
    """The model to train, without a DistributedDataParallel wrapper: the trainer
    averages gradients itself, and DDP's reduction beside it would fail on the
    student parts that stage 2 leaves without gradients."""
    layer = model
    while (inner := wrapped_module(layer)) is not None:
        if isinstance(layer, nn.parallel.DistributedDataParallel):
            return inner
        if isinstance(layer, nn.DataParallel):
            raise ValueError(
                f"the {role} is wrapped in nn.DataParallel, which the distiller does not "
                "run; pass the model itself, and for several GPUs launch one process per "
                "GPU with torchrun (the trainer averages gradients across them)"
            )
        layer = inner
    return model


def _check_separate(teacher: nn.Module, student: nn.Module) -> None:
    """Training the student must leave the frozen teacher as it is."""
    teacher_parameters = {id(p) for p in teacher.parameters()}
    shared = [name for name, p in student.named_parameters() if id(p) in teacher_parameters]
    if teacher is student or shared:
        what = "are the same model" if teacher is student else f"share parameters ({shared[0]}, ...)"
        raise ValueError(
            f"teacher and student {what}: training the student would change the "
            "teacher; give the student its own copy (copy.deepcopy)"
        )


def _input_shape(input_shape: object) -> list[int]:
    if isinstance(input_shape, Sequence) and not isinstance(input_shape, str):
        return [as_int("input_shape", size) for size in input_shape]
    raise TypeError(
        f"input_shape must be the (C, H, W) of one input, got {type(input_shape).__name__}"
    )


def _check_placement(teacher: nn.Module, student: nn.Module) -> None:
    """Both models see the same batches: refuse a pair that could not."""
    placements = [(module_dtype(m), module_device(m)) for m in (teacher, student)]
    if placements[0] != placements[1]:
        (t_dtype, t_device), (s_dtype, s_device) = placements
        raise ValueError(
            f"teacher and student must share a dtype and device, got a {t_dtype} teacher on "
            f"{t_device} and a {s_dtype} student on {s_device}; move one with .to(...) "
            "(for mixed precision use the trainer's amp)"
        )


def _pair_names(pairs: list[tuple[str, str]], prefix: str, side: int) -> list[str]:
    """``prefix/path`` per pair, with its teacher (``side=0``) or student path, or
    ``prefix/teacher->student`` where other pairs share that path."""
    counts = Counter(pair[side] for pair in pairs)
    return [
        f"{prefix}/{pair[side]}" if counts[pair[side]] == 1 else f"{prefix}/{pair[0]}->{pair[1]}"
        for pair in pairs
    ]


def _first_images(loader: Iterable, why: str) -> Tensor:
    batches = iter(loader)
    if batches is loader:
        # Its first batch, taken here, would be missing from the training.
        raise ValueError(
            f"the loader is a one-shot iterator and {why} batch, which training would then "
            "miss: pass input_shape or example_input to SRMDistiller, or a loader that can "
            "be iterated again (a DataLoader or a list of batches)"
        )
    batch = next(batches, None)
    if batch is None:
        raise ValueError(f"the loader yielded no batches, and {why}")
    return image_batch(batch)[0]


def _fingerprint(representation: SparseRepresentation) -> Tensor | None:
    """A few of its values, on the CPU: any training step or load changes them.
    None on the meta device, where there are no values (the blocks get theirs
    when the models are materialised and loaded)."""
    if representation.dictionary.is_meta:
        return None
    values = torch.cat([representation.dictionary.detach()[0, :64], representation.intercept.detach()])
    return values.to("cpu", copy=True)


def _block_dtype(model: nn.Module) -> torch.dtype:
    """The SRM blocks' parameter dtype for ``model``'s maps: float64 for a
    float64 model, whose maps float32 blocks would round; float32 otherwise,
    half-precision models included (the blocks cast the maps up)."""
    return torch.float64 if module_dtype(model) == torch.float64 else torch.float32
