"""Reading intermediate feature maps out of unmodified models with forward hooks."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["FeatureTap", "resolve_module"]


def resolve_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """The submodule at dotted ``path`` (as in ``named_modules()``).

    Raises ``ValueError`` naming the closest existing paths when it is missing.
    """
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.4)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ValueError(f"{role} has no module {path!r}{hint}")


class FeatureTap:
    """Captures the outputs of the submodules at ``paths`` of ``model``.

    Hooks are attached only inside :meth:`capture`, so the model carries no hooks
    the rest of the time (it can be saved, exported or compiled as it is)::

        tap = FeatureTap(teacher, ["block1", "block2"], role="teacher")
        with tap.capture() as features:
            logits = teacher(images)
        features["block1"]  # (N, C, H, W)
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], role: str = "model") -> None:
        self.model = model
        self.role = role
        self.paths = list(paths)
        self._modules = {path: resolve_module(model, path, role) for path in self.paths}

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        features: dict[str, Tensor] = {}
        handles = [
            module.register_forward_hook(self._make_hook(path, features))
            for path, module in self._modules.items()
        ]
        try:
            yield features
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def probe(self, batch: Tensor) -> dict[str, Tensor]:
        """The tapped maps of one eval-mode forward pass on ``batch`` (a dry run that
        finds channel counts and grids); the model's train/eval mode is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.capture() as maps:
                self.model(batch)
        finally:
            self.model.train(was_training)
        missing = [path for path in self.paths if path not in maps]
        if missing:
            raise ValueError(
                f"{self.role} modules {', '.join(map(repr, missing))} did not run in the forward pass"
            )
        return dict(maps)

    def _make_hook(self, path: str, features: dict[str, Tensor]):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if not isinstance(output, Tensor) or output.dim() != 4:
                got = (
                    f"a tensor of shape {tuple(output.shape)}"
                    if isinstance(output, Tensor)
                    else f"a {type(output).__name__}"
                )
                raise TypeError(
                    f"{self.role} module {path!r} returned {got}; SRM needs a 4-D "
                    "(N, C, H, W) feature map there, so pick a convolutional layer"
                )
            features[path] = output

        return hook
