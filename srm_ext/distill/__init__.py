"""Knowledge distillation with SRM on your own models, the baselines it is
compared with, and the experiment runner behind ``srm-ext distill``.

* :class:`SRMDistiller`: the three SRM stages on any teacher/student pair.
* :class:`Trainer` and :class:`Stage`: the shared epoch loop.
* :mod:`.losses`: KD, FitNet, SP and AT losses.
* :class:`ExperimentRunner`: teacher + students x methods x seeds, resumable.
* :func:`load_trained_model`: a model such a run trained, ready for inference.
"""

from .config import ConfigError, ExperimentConfig, StageConfig
from .distiller import DEFAULT_STAGE_CONFIGS, SRMDistiller
from .distributed import DistributedContext
from .experiment import ExperimentRunner, run_experiment
from .hooks import FeatureTap
from .metrics import accuracy
from .trained import load_trained_model, trained_model_names
from .trainer import Stage, Trainer

__all__ = [
    "ConfigError",
    "DEFAULT_STAGE_CONFIGS",
    "DistributedContext",
    "ExperimentConfig",
    "ExperimentRunner",
    "FeatureTap",
    "SRMDistiller",
    "Stage",
    "StageConfig",
    "Trainer",
    "accuracy",
    "load_trained_model",
    "run_experiment",
    "trained_model_names",
]
