"""Models that ``srm-ext distill`` trained, ready for inference.

A run's ``models/*.pt`` are plain state dicts; :func:`load_trained_model`
rebuilds the architecture from the run's ``config.json`` and puts the run's
input normalisation in front, so the model takes images as the data loaders
gave them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .config import ConfigError, ExperimentConfig
from .data import InputNormalization
from .models import build_model

__all__ = ["load_trained_model", "model_path", "trained_model_names"]


MODELS_DIR = "models"  # in a run's output directory


def model_path(output_dir: str | Path, run: str) -> Path:
    """Where a run's finished model ``run`` (``"teacher"``, ``"srm/seed0"`` or
    ``"srm-seed0"``) is saved."""
    return Path(output_dir) / MODELS_DIR / f"{run.replace('/', '-')}.pt"


def trained_model_names(output_dir: str | Path) -> list[str]:
    """The models a run has finished: ``"teacher"``, ``"srm-seed0"``, ..."""
    return sorted(path.stem for path in (Path(output_dir) / MODELS_DIR).glob("*.pt"))


def load_trained_model(
    output_dir: str | Path, name: str, device: torch.device | str = "cpu"
) -> nn.Sequential:
    """The model ``name`` of the run in ``output_dir`` (``"teacher"`` or a
    student, ``"srm-seed0"``; ``"srm/seed0"`` as the results name it works
    too), in eval mode: ``InputNormalization`` followed by the network.

    It takes ``(N, C, S, S)`` images, with ``S`` the run's image size
    (``config.json``'s ``resolved.image_size``), as uint8 or as floats in
    [0, 1], and returns logits.
    """
    out = Path(output_dir)
    weights = model_path(out, name)
    if not weights.exists():
        found = ", ".join(trained_model_names(out)) or "none"
        raise ConfigError(f"{out} has no trained model {weights.stem!r}; it has: {found}")
    settings = run_settings(out)
    arch, width = ExperimentConfig.from_dict(settings).architecture(weights.stem)
    resolved = settings["resolved"]
    network = build_model(arch, resolved["num_classes"], resolved["in_channels"], width)
    network.load_state_dict(load_checkpoint(weights))
    model = nn.Sequential(InputNormalization(resolved["mean"], resolved["std"]), network)
    return model.to(device).eval()


def run_settings(out: Path) -> dict:
    """The run's ``config.json``, which must record its models' input under
    ``resolved``; a ConfigError naming the file otherwise."""
    path = out / "config.json"
    if not path.exists():
        raise ConfigError(f"{out} holds no run: {path} is missing")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    needed = ("num_classes", "in_channels", "mean", "std")
    resolved = settings.get("resolved") if isinstance(settings, dict) else None
    if not isinstance(resolved, dict) or any(key not in resolved for key in needed):
        raise ConfigError(
            f"{path} does not record the model's input ({', '.join(needed)} under "
            "'resolved'): the run was written by an older version or stopped before "
            "its data loaded"
        )
    return settings
