"""Configuration of training stages and of whole distillation experiments."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from .._validation import as_float, as_int

__all__ = [
    "ConfigError",
    "error_line",
    "StageConfig",
    "ExperimentConfig",
    "AMP_MODES",
    "METHODS",
    "PAIRED_METHODS",
    "PRESETS",
    "RESUME_INVARIANT_EXCLUDES",
]

#: Methods the experiment runner knows, in the order results are reported.
METHODS = ("scratch", "kd", "fitnet", "sp", "at", "srm")
#: The methods that train on layer pairs.
PAIRED_METHODS = ("fitnet", "sp", "at", "srm")
#: Mixed-precision modes: none, or autocast to bfloat16 or float16.
AMP_MODES = ("none", "bf16", "fp16")


class ConfigError(ValueError):
    """A user-facing configuration mistake (bad flag value, missing file, ...)."""


def error_line(exc: BaseException) -> str:
    """The one line of ``exc``'s message that says what went wrong.

    Headers ending in ":" are passed over, such as torch.compile's
    "backend='inductor' raised:" or load_state_dict's "Error(s) in loading
    state_dict for DenseNet:". An error raised in a DataLoader worker comes
    back as "Caught <type> in DataLoader worker ..." followed by the worker's
    traceback, whose last line holds the original message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 2 and lines[0].startswith("Caught ") and "Traceback" in lines[1]:
        # "srm_ext.distill.config.ConfigError: message" -> "message"
        prefix = f"{type(exc).__name__}: "
        last = lines[-1]
        at = last.find(prefix)
        return last[at + len(prefix):] if at >= 0 else last
    return next((line for line in lines if not line.endswith(":")), lines[0])


@dataclass
class StageConfig:
    """Optimiser and learning-rate schedule of one training stage.

    The defaults follow the SRM paper: Adam, lr 1e-3, weight decay 1e-4, and a step
    schedule dividing the lr by 10 after 15% and 65% of the epochs (the authors'
    30/100/70-epoch split).
    """

    epochs: int = 1
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only: Nesterov momentum; 0 gives plain SGD
    schedule: str = "step"  # none | step | cosine
    milestones: tuple[float, ...] = (0.15, 0.65)  # step: fractions of `epochs`
    gamma: float = 0.1  # step: lr factor at each milestone

    def __post_init__(self) -> None:
        self.epochs = as_int("epochs", self.epochs)
        for name in ("lr", "weight_decay", "momentum", "gamma"):
            setattr(self, name, as_float(name, getattr(self, name)))
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; use adam, adamw or sgd")
        if self.schedule not in ("none", "step", "cosine"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; use none, step or cosine")
        # `not value > 0` also refuses NaN, which a `<= 0` test lets through.
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        self.milestones = tuple(float(m) for m in self.milestones)
        if any(not 0.0 < m <= 1.0 for m in self.milestones):
            raise ConfigError(
                f"milestones are fractions of the epochs in (0, 1], got {list(self.milestones)}"
            )
        if not self.gamma > 0:
            raise ConfigError(f"gamma must be > 0, got {self.gamma}")
        for name in ("lr", "weight_decay", "gamma"):
            if getattr(self, name) == math.inf:
                raise ConfigError(f"{name.replace('_', ' ')} must be finite, got inf")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must lie in [0, 1), got {self.momentum}")

    def replace(self, **changes: Any) -> "StageConfig":
        """A copy with ``changes`` applied (validated like a new config)."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown stage setting(s) {', '.join(map(repr, unknown))}; "
                f"a stage has {', '.join(names)}"
            )
        return dataclasses.replace(self, **changes)


@dataclass
class ExperimentConfig:
    """Everything ``srm-ext distill`` needs; saved as ``config.json`` in the run dir.

    ``batch_size`` is the global batch: under torch.distributed every process takes
    ``batch_size / world_size`` samples per batch, so results do not depend on the
    number of processes (up to BatchNorm statistics). An optimiser step follows
    the mean loss of ``accumulate_steps`` batches.
    """

    # data
    dataset: str = "digits"  # digits | cifar10 | cifar100 | imagefolder | npz
    data_path: str | None = None
    image_size: int | None = None  # resize to SxS; None: digits 8, ImageFolder 32, others as stored
    augment: bool = True  # random translations, and flips where `flip`
    flip: bool = True  # with augment: horizontal flips of 3-channel (natural) images
    train_limit: int | None = None  # use only N training samples, spread evenly (smoke tests)
    test_limit: int | None = None
    # Channel mean and std that inputs in [0, 1] are normalised with; None:
    # the training split's. A teacher trained elsewhere wants its own.
    input_mean: list[float] | None = None
    input_std: list[float] | None = None
    # Read every image of an image tree before training, to find unreadable ones.
    check_images: bool = False
    # models
    teacher: str = "densenet"
    student: str = "allcnn"
    teacher_width: float = 1.0
    student_width: float = 0.25
    layer_pairs: list[str] | None = None  # ["teacher.path:student.path", ...]; None: arch defaults
    # A state dict of the teacher architecture (or an earlier run's output
    # directory, for its models/teacher.pt): the teacher is loaded, not trained.
    teacher_weights: str | None = None
    # SRM
    codeword_multiplier: float = 2.0
    sparsity_multiplier: float = 0.02
    local_weight: float = 1.0
    global_weight: float = 1.0
    # KD (stage 3 and the KD baseline)
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    # other baselines
    fitnet_weight: float = 1.0
    sp_weight: float = 3000.0
    # AT: None is the paper's 1000 (methods.AT_PAPER_WEIGHT), at every input size.
    at_weight: float | None = None
    # schedule
    methods: list[str] = field(default_factory=lambda: ["scratch", "kd", "srm"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # The teacher is trained once, with its own seed, so a student's result
    # does not depend on which other seeds are in the list.
    teacher_seed: int = 0
    epochs_teacher: int = 20
    epochs_dictionary: int = 5
    epochs_init: int = 5
    epochs_student: int = 20  # KD stage of srm/fitnet, and the only stage of the rest
    batch_size: int = 64
    accumulate_steps: int = 1  # batches whose gradients make one optimiser step
    lr: float = 1e-3
    lr_srm: float = 1e-3  # stages 1 and 2 (and FitNet's hint stage)
    weight_decay: float = 1e-4
    max_grad_norm: float | None = None  # clip the gradients' total norm; None: no clipping
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only: Nesterov momentum; 0 gives plain SGD
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.15, 0.65])  # step schedule
    gamma: float = 0.1  # step schedule: lr factor at each milestone
    # runtime
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16
    output_dir: str = "runs/distill"
    num_workers: int = 0
    threads: int | None = None  # torch intra-op threads; None: half the CPU cores per process
    quiet: bool = False
    compile: bool = False  # run the teacher and students through torch.compile
    preset: str = "default"

    def __post_init__(self) -> None:
        self._check_types()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(
                f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}"
            )
        if not self.methods:
            raise ConfigError("at least one method is needed")
        if self.teacher_weights is not None and not (
            isinstance(self.teacher_weights, str) and self.teacher_weights
        ):
            raise ConfigError(f"teacher weights must be a path, got {self.teacher_weights!r}")
        self._check_input_statistics()
        if not self.seeds:
            raise ConfigError("at least one seed is needed")
        for seed in [*self.seeds, self.teacher_seed]:
            # numpy takes seeds below 2**32; torch's generators no more than 64 bits.
            if not 0 <= seed < 2**32:
                raise ConfigError(f"seeds must lie in [0, 2**32), got {seed}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.accumulate_steps < 1:
            raise ConfigError(f"accumulate steps must be >= 1, got {self.accumulate_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max grad norm must be > 0, got {self.max_grad_norm}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"unknown amp mode {self.amp!r}; use none, bf16 or fp16")
        for name in ("epochs_teacher", "epochs_dictionary", "epochs_init", "epochs_student"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ConfigError(f"kd alpha must lie in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise ConfigError(f"kd temperature must be > 0, got {self.kd_temperature}")
        for name in ("train_limit", "test_limit", "image_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {value}")
        if self.num_workers < 0:
            raise ConfigError(f"num workers must be >= 0, got {self.num_workers}")
        for name in ("local_weight", "global_weight", "fitnet_weight", "sp_weight", "at_weight"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 0, got {value}")
        for name in ("codeword_multiplier", "sparsity_multiplier"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be > 0, got {getattr(self, name)}")
        if len(set(self.methods)) < len(self.methods) or len(set(self.seeds)) < len(self.seeds):
            raise ConfigError(
                f"methods and seeds must not repeat, got methods {self.methods} "
                f"and seeds {self.seeds}"
            )
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda"):  # the devices the runs are made for and tested on
                raise ConfigError(
                    f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N"
                )
        for name in ("lr", "lr_srm"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        # Validate every stage's settings now: a mistake found only when its
        # stage starts would cost every run trained before it.
        for kind in ("teacher", "dictionary", "init", "student"):
            self.stage(kind)

    def _check_types(self) -> None:
        """Refuse wrong types (a hand-edited config.json) and non-finite floats,
        which would otherwise surface as a NaN loss after the teacher trained.
        The numeric settings are the fields annotated ``int`` or ``float``
        (``| None`` where None is allowed); the yes/no ones, ``bool``, whose
        ``"false"`` would otherwise count as on."""
        for f in dataclasses.fields(self):
            kind, _, optional = f.type.partition(" | ")
            if kind not in ("int", "float", "bool"):
                continue
            value = getattr(self, f.name)
            if value is None and optional == "None":
                continue
            label = f.name.replace("_", " ")
            if kind == "bool":
                if not isinstance(value, bool):
                    raise ConfigError(f"{label} must be true or false, got {value!r}")
                continue
            types = numbers.Integral if kind == "int" else numbers.Real
            if isinstance(value, bool) or not isinstance(value, types):
                expected = "an integer" if kind == "int" else "a number"
                raise ConfigError(f"{label} must be {expected}, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{label} must be finite, got {value}")

    def _check_input_statistics(self) -> None:
        for name in ("input_mean", "input_std"):
            values = getattr(self, name)
            if values is None:
                continue
            label = name.replace("_", " ")
            if not isinstance(values, (list, tuple)) or not values or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            ):
                raise ConfigError(f"{label} must be finite numbers, one per channel, got {values!r}")
            setattr(self, name, [float(v) for v in values])  # as config.json gives it back
        if self.input_std is not None and min(self.input_std) <= 0:
            raise ConfigError(f"input std must be > 0 in every channel, got {self.input_std}")

    def stage(self, kind: str) -> StageConfig:
        """Stage settings for ``kind``: teacher | dictionary | init | student."""
        epochs = {
            "teacher": self.epochs_teacher,
            "dictionary": self.epochs_dictionary,
            "init": self.epochs_init,
            "student": self.epochs_student,
        }[kind]
        lr = self.lr_srm if kind in ("dictionary", "init") else self.lr
        # Stages 1 and 2 use a constant lr in short runs: their job is a good
        # starting point for stage 3, not convergence of a long schedule.
        schedule = "none" if kind in ("dictionary", "init") else self.schedule
        return StageConfig(
            epochs=epochs,
            optimizer=self.optimizer,
            lr=lr,
            weight_decay=0.0 if kind == "dictionary" else self.weight_decay,
            momentum=self.momentum,
            schedule=schedule,
            milestones=tuple(self.milestones),
            gamma=self.gamma,
        )

    def architecture(self, role: str) -> tuple[str, float]:
        """The architecture and width multiplier of the ``"teacher"`` or the students."""
        if role == "teacher":
            return self.teacher, self.teacher_width
        return self.student, self.student_width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ExperimentConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# Settings that must agree between an interrupted run and its --resume: all but
# these, which change how a run is carried out, not what it computes (compile
# runs the same steps through torch.compile, faster).
RESUME_INVARIANT_EXCLUDES = (
    "quiet", "device", "num_workers", "threads", "compile", "output_dir", "preset", "check_images"
)

#: Named bundles of settings; explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    # Digits, 3 seeds, scratch/KD/SRM: a few minutes on two CPU cores.
    "default": {},
    # The same story in well under two minutes: one seed, fewer epochs.
    "quick": {
        "seeds": [0],
        "epochs_teacher": 10,
        "epochs_dictionary": 2,
        "epochs_init": 3,
        "epochs_student": 10,
    },
}
