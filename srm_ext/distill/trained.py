"""Models that ``srm-ext distill`` trained, ready for inference.

A run's ``models/*.pt`` are plain state dicts; :func:`load_trained_model`
rebuilds the architecture from the run's ``config.json`` and puts the run's
input normalisation in front, so the model takes images as the data loaders
gave them. :func:`find_state_dict` finds a model's weights in a checkpoint
that another training script wrote.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .checkpoint import load_checkpoint
from .config import ConfigError, ExperimentConfig
from .data import InputNormalization
from .models import build_model

__all__ = ["find_state_dict", "load_trained_model", "model_path", "trained_model_names"]


MODELS_DIR = "models"  # in a run's output directory

# Where training scripts commonly keep a model's weights in a checkpoint dict.
_WEIGHTS_ENTRIES = ("state_dict", "model_state_dict", "model")
# Key prefixes of wrapped models: DistributedDataParallel's, torch.compile's.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def find_state_dict(checkpoint: object, model: nn.Module) -> tuple[object, list[str]]:
    """The state dict for ``model`` in ``checkpoint`` as loaded, and how it was
    found: the checkpoint itself, or its ``"state_dict"``, ``"model_state_dict"``
    or ``"model"`` entry; without the ``module.`` or ``_orig_mod.`` prefix that
    a wrapper put on every key and ``model``'s own keys lack. Anything else is
    returned as it is, for ``load_state_dict`` to refuse."""
    found = []
    if isinstance(checkpoint, dict) and not _is_state_dict(checkpoint):
        entry = next((e for e in _WEIGHTS_ENTRIES if _is_state_dict(checkpoint.get(e))), None)
        if entry is not None:
            checkpoint = checkpoint[entry]
            found.append(f"its {entry!r} entry")
    if not _is_state_dict(checkpoint):
        return checkpoint, found
    weights = OrderedDict(checkpoint)  # renamed below: the caller's object stays as it was
    if hasattr(checkpoint, "_metadata"):  # module versions, which load_state_dict reads
        weights._metadata = OrderedDict(checkpoint._metadata)
    own_keys = list(model.state_dict())

    def wrapper_prefix() -> str | None:
        return next((p for p in _WRAPPER_PREFIXES if _all_start_with(weights, p)
                     and not _all_start_with(own_keys, p)), None)

    while prefix := wrapper_prefix():
        consume_prefix_in_state_dict_if_present(weights, prefix)
        found.append(f"keys without {prefix!r}")
    return weights, found


def _all_start_with(keys: Iterable[str], prefix: str) -> bool:
    return all(key.startswith(prefix) for key in keys)


def _is_state_dict(candidate: object) -> bool:
    return (
        isinstance(candidate, dict)
        and bool(candidate)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in candidate.items())
    )
