"""Reading intermediate feature maps out of unmodified models with forward hooks."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["FeatureMaps", "FeatureTap", "FeatureTapError", "resolve_module"]


class FeatureTapError(RuntimeError):
    """A tapped map that cannot be trusted: modified in place, produced twice,
    or not produced at all."""


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


class FeatureMaps(Mapping[str, Tensor]):
    """The maps of one :meth:`FeatureTap.capture`, by module path.

    The hooks keep the output tensors themselves rather than copies (copying
    every map would double their memory), so an in-place op later in the
    forward pass (``out += identity``, ``ReLU(inplace=True)``) would change a
    stored map. Each map's version counter is recorded when its module
    returns it, and reading a map that has been modified since raises (maps
    captured under torch.compile or in inference mode carry no usable counter
    and are not checked).
    """

    def __init__(self, role: str = "model", paths: Sequence[str] = ()) -> None:
        self._role = role
        self._paths = set(paths)
        self._maps: dict[str, Tensor] = {}
        self._versions: dict[str, int | None] = {}
        self._training: bool | None = None  # mode of the last forward pass

    def __getitem__(self, path: str) -> Tensor:
        if path not in self._maps:
            if path not in self._paths:
                raise KeyError(path)
            # e.g. a branch taken only in eval mode, which the dry run uses
            mode = "" if self._training is None else (
                f" (in {'training' if self._training else 'eval'} mode)"
            )
            raise FeatureTapError(
                f"{self._role} module {path!r} did not run in the last forward pass{mode}; "
                "tap a module that runs in every forward pass, in training and in eval mode"
            )
        tensor = self._maps[path]
        version = self._versions[path]
        if version is not None and tensor._version != version:
            raise FeatureTapError(
                f"{self._role} module {path!r}: its output was modified in place later in the "
                "forward pass (e.g. `out += identity` or ReLU(inplace=True)), so it no longer "
                "holds that module's output; tap the module after the in-place op (e.g. the "
                "enclosing block), or a module whose output is not modified in place"
            )
        return tensor

    def __contains__(self, path: object) -> bool:
        return path in self._maps

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def _store(self, path: str, tensor: Tensor) -> None:
        if path in self._maps:
            raise FeatureTapError(
                f"{self._role} module {path!r} ran more than once in one forward pass, so "
                "its output is ambiguous; tap a module that runs once per forward pass "
                "(e.g. give each use of a shared layer its own module)"
            )
        self._maps[path] = tensor
        # Under torch.compile the hooks see traced tensors, and inference tensors
        # have no version counter: such maps go unchecked.
        unchecked = torch.compiler.is_compiling() or tensor.is_inference()
        self._versions[path] = None if unchecked else tensor._version

    def _start(self, model: nn.Module, args: object) -> None:
        """Forward pre-hook of the tapped model: each pass starts afresh."""
        self._maps.clear()
        self._versions.clear()
        self._training = model.training


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
    def capture(self) -> Iterator[FeatureMaps]:
        """Hooks the tapped modules while the block runs. The maps hold the last
        forward pass of ``model``: each call of the model starts afresh, and a
        tapped module that runs twice within one pass raises."""
        features = FeatureMaps(self.role, self.paths)
        handles = [self.model.register_forward_pre_hook(features._start)]
        handles += [
            module.register_forward_hook(self._make_hook(path, features))
            for path, module in self._modules.items()
        ]
        try:
            yield features
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def probe(
        self, batch: Tensor, return_output: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], object]:
        """The tapped maps of one eval-mode forward pass on ``batch`` (a dry run that
        finds channel counts and grids), and the model's output if ``return_output``;
        the model's train/eval mode is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.capture() as maps:
                output = self.model(batch)
        except FeatureTapError:
            raise
        except RuntimeError as exc:
            # Most often an input the model cannot take: say which model, and
            # on what, before the error from deep inside it.
            raise RuntimeError(
                f"the {self.role} failed on a dry-run batch of shape {tuple(batch.shape)} "
                f"(is that the input it takes?): {exc}"
            ) from exc
        finally:
            self.model.train(was_training)
        missing = [path for path in self.paths if path not in maps]
        if missing:
            raise ValueError(
                f"{self.role} modules {', '.join(map(repr, missing))} did not run in the "
                "forward pass (a dry run in eval mode); tap modules that run in every pass"
            )
        maps = {path: maps[path] for path in self.paths}  # reading checks for in-place changes
        return (maps, output) if return_output else maps

    def _make_hook(self, path: str, features: FeatureMaps):
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
            features._store(path, output)

        return hook
