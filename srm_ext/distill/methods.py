"""Training recipes compared by the experiment runner, all on the same trainer:

* ``scratch``: cross-entropy only.
* ``kd``: Hinton KD (the same loss as SRM's stage 3).
* ``fitnet``: hint stage (student up to the guided layers + 1x1-conv regressors,
  MSE to the teacher's hint layers; ``epochs_init`` epochs), then KD.
* ``sp``: cross-entropy + ``sp_weight`` x similarity-preserving loss over the pairs.
* ``at``: cross-entropy + ``at_weight`` x attention-transfer loss over the pairs
  (default: the paper's 1000, which its authors use at every input size).
* ``srm``: the three SRM stages (:class:`SRMDistiller`).

Plus ``teacher``: the teacher trained from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ExperimentConfig, StageConfig
from .distiller import SRMDistiller
from .hooks import FeatureTap, parameters_except
from .losses import (
    HintRegressor,
    attention_transfer_loss,
    classification_loss,
    kd_loss,
    similarity_preserving_loss,
)
from .trainer import Stage

__all__ = ["MethodPlan", "build_plan", "cross_entropy_stage"]


@dataclass
class MethodPlan:
    """The stages of one method and every module whose state a checkpoint keeps.
    ``student`` is the model being trained (the teacher, in the teacher's run)."""

    student: nn.Module
    modules: dict[str, nn.Module]
    stages: list[Stage]


def cross_entropy_stage(name: str, model: nn.Module, config: StageConfig) -> Stage:
    return Stage(
        name=name,
        objective=lambda images, targets: classification_loss(model(images), targets),
        parameters=list(model.parameters()),
        train_modules=[model],
        config=config,
    )


def _kd_stage(name: str, teacher: nn.Module, student: nn.Module, cfg: ExperimentConfig) -> Stage:
    def objective(images: Tensor, targets: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(images)
        return kd_loss(student(images), teacher_logits, targets, cfg.kd_temperature, cfg.kd_alpha)

    return Stage(name, objective, list(student.parameters()), [student], cfg.stage("student"), [teacher])


def _feature_regulariser_stage(
    name: str,
    teacher: nn.Module,
    student: nn.Module,
    pairs: list[tuple[str, str]],
    term: Callable[[Tensor, Tensor], Tensor],
    weight: float,
    cfg: ExperimentConfig,
) -> Stage:
    """Cross-entropy + ``weight`` x ``term(student map, teacher map)`` summed over pairs."""
    t_tap = FeatureTap(teacher, [t for t, _ in pairs], "teacher")
    s_tap = FeatureTap(student, [s for _, s in pairs], "student")

    def objective(images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad(), t_tap.capture() as t_maps:
            teacher(images)
        with s_tap.capture() as s_maps:
            logits = student(images)
        ce = classification_loss(logits, targets)
        transfer = sum(term(s_maps[s], t_maps[t]) for t, s in pairs)
        return ce + weight * transfer, {"ce": ce, name: transfer}

    return Stage(name, objective, list(student.parameters()), [student], cfg.stage("student"), [teacher])


def _fitnet_stages(
    teacher: nn.Module,
    student: nn.Module,
    pairs: list[tuple[str, str]],
    example: Tensor,
    cfg: ExperimentConfig,
) -> tuple[nn.ModuleList, list[Stage]]:
    t_tap = FeatureTap(teacher, [t for t, _ in pairs], "teacher")
    s_tap = FeatureTap(student, [s for _, s in pairs], "student")
    t_probe, s_probe = t_tap.probe(example), s_tap.probe(example)
    regressors = nn.ModuleList(
        HintRegressor(s_probe[s].shape[1], t_probe[t].shape[1]) for t, s in pairs
    ).to(example.device)

    def hint_objective(images: Tensor, _targets: Tensor) -> Tensor:
        with torch.no_grad(), t_tap.capture() as t_maps:
            teacher(images)
        with s_tap.capture() as s_maps:
            student(images)
        return cfg.fitnet_weight * sum(
            regressor(s_maps[s], t_maps[t]) for regressor, (t, s) in zip(regressors, pairs)
        )

    # The layers past the guided ones get no gradient from the hints: left
    # out, so that weight decay leaves them as eager autograd does.
    guided = parameters_except(student, s_tap.parameters_off_the_maps(example))
    hint = Stage(
        "fitnet-hint",
        hint_objective,
        [*guided, *regressors.parameters()],
        [student, regressors],
        cfg.stage("init"),
        [teacher],
        trains_classifier=False,
    )
    return regressors, [hint, _kd_stage("fitnet-kd", teacher, student, cfg)]


#: The AT paper's loss weight (beta), which its authors' code and the SRM
#: authors' baselines use for 32x32 and 224x224 inputs alike: the loss already
#: averages over the attention map's elements, as the paper's beta divides by them.
AT_PAPER_WEIGHT = 1000.0


def attention_transfer_weight(cfg: ExperimentConfig) -> float:
    """The AT loss weight: ``cfg.at_weight``, else the paper's."""
    return AT_PAPER_WEIGHT if cfg.at_weight is None else cfg.at_weight


def build_plan(
    method: str,
    teacher: nn.Module,
    student: nn.Module,
    layer_pairs: list[tuple[str, str]],
    example: Tensor,
    cfg: ExperimentConfig,
) -> MethodPlan:
    """The stages of ``method`` for ``student`` (fresh) distilled from ``teacher``.
    ``example`` is an input batch on the training device, for dry runs."""
    modules: dict[str, nn.Module] = {"student": student}
    if method == "scratch":
        stages = [cross_entropy_stage("scratch", student, cfg.stage("student"))]
    elif method == "kd":
        stages = [_kd_stage("kd", teacher, student, cfg)]
    elif method == "sp":
        stages = [
            _feature_regulariser_stage(
                "sp", teacher, student, layer_pairs, similarity_preserving_loss, cfg.sp_weight, cfg
            )
        ]
    elif method == "at":
        stages = [
            _feature_regulariser_stage(
                "at",
                teacher,
                student,
                layer_pairs,
                attention_transfer_loss,
                attention_transfer_weight(cfg),
                cfg,
            )
        ]
    elif method == "fitnet":
        modules["regressors"], stages = _fitnet_stages(teacher, student, layer_pairs, example, cfg)
    elif method == "srm":
        distiller = SRMDistiller(
            teacher,
            student,
            layer_pairs,
            cfg.codeword_multiplier,
            cfg.sparsity_multiplier,
            example_input=example,
            local_weight=cfg.local_weight,
            global_weight=cfg.global_weight,
            kd_temperature=cfg.kd_temperature,
            kd_alpha=cfg.kd_alpha,
        )
        modules["representations"] = distiller.representations
        modules["predictors"] = distiller.predictors
        stages = distiller.stages(
            {
                "dictionary": cfg.stage("dictionary"),
                "init": cfg.stage("init"),
                "kd": cfg.stage("student"),
            }
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    return MethodPlan(student, modules, stages)
