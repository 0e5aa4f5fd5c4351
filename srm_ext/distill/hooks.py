"""Reading intermediate feature maps out of unmodified models with forward hooks."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
import torch._dynamo.config as dynamo_config
from torch import Tensor, nn

from .._backend import user_stacklevel

__all__ = [
    "FeatureMaps",
    "FeatureTap",
    "FeatureTapError",
    "eval_mode",
    "parameters_except",
    "resolve_module",
    "unwrap",
    "wrapper_prefix",
]


class FeatureTapError(RuntimeError):
    """A tapped map that cannot be trusted: modified in place, produced twice,
    or not produced at all."""


def wrapped_module(model: nn.Module) -> nn.Module | None:
    """The module that ``model`` wraps, when it is ``torch.compile``'s
    ``OptimizedModule`` or a data-parallel wrapper; else None."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    if isinstance(model, torch.jit.ScriptModule):  # its _modules is no dict
        return None
    return model._modules.get("_orig_mod")  # torch.compile's OptimizedModule


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside all of ``model``'s wrappers, whose submodules have the
    paths of the plain model (without ``_orig_mod.`` or ``module.`` in front)."""
    while (inner := wrapped_module(model)) is not None:
        model = inner
    return model


def wrapper_prefix(model: nn.Module) -> str:
    """What ``model``'s wrappers put in front of the plain model's state-dict
    keys: ``"_orig_mod."`` for ``torch.compile(model)``, ``""`` for no wrapper."""
    prefix = ""
    while (inner := wrapped_module(model)) is not None:
        prefix += next(name for name, child in model._modules.items() if child is inner) + "."
        model = inner
    return prefix


def check_runs_hooks(module: nn.Module, what: str) -> None:
    """Refuses a TorchScript module, which never runs the forward hooks that
    the features are taken with."""
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            f"{what} is a TorchScript module, which runs no forward hooks, and the features "
            "are taken with hooks: use the Python module it was scripted from"
        )


def parameters_except(model: nn.Module, names: set[str]) -> list[nn.Parameter]:
    """``model``'s parameters but those at ``names`` (paths of the plain model)."""
    return [p for name, p in unwrap(model).named_parameters() if name not in names]


def resolve_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """The submodule at dotted ``path`` (as in ``named_modules()``), of ``model``
    or of the model inside its wrappers (:func:`unwrap`).

    Raises ``ValueError`` naming the closest existing paths when it is missing.
    """
    for candidate in (model, unwrap(model)):
        # remove_duplicate=False: a module also reached through an alias
        # attribute answers to both of its paths.
        modules = dict(candidate.named_modules(remove_duplicate=False))
        if path in modules and path != "":
            return modules[path]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.4)
    if close:
        hint = f"; closest: {', '.join(close)}"
    else:  # nothing alike: where its paths start
        hint = f"; its top-level modules: {', '.join(name for name in names if '.' not in name)}"
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
    the rest of the time (it can be saved, exported or compiled as it is). Paths
    are those of the plain model, also when ``model`` is compiled or wrapped; a
    compiled model's first capture turns on torch.compile's guards on module
    hooks, with a warning::

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
        for path, module in self._modules.items():
            check_runs_hooks(module, f"{role} module {path!r}")
        self._all_modules = list(model.modules())  # searched for compiled ones at each capture

    def plain_paths(self) -> list[str]:
        """Each tapped module's path as the plain model names it first: the
        same for a path through a ``torch.compile`` wrapper (``_orig_mod.``)
        or an alias attribute."""
        first_names = {id(module): name for name, module in unwrap(self.model).named_modules()}
        return [first_names.get(id(self._modules[path]), path) for path in self.paths]

    @contextmanager
    def capture(self) -> Iterator[FeatureMaps]:
        """Hooks the tapped modules while the block runs. The maps hold the last
        forward pass of ``model``: each call of the model starts afresh, and a
        tapped module that runs twice within one pass raises."""
        if (
            dynamo_config.skip_nnmodule_hook_guards
            and not torch.compiler.is_compiling()
            and _any_compiled(self._all_modules)
        ):
            _guard_module_hooks(self.role)
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
        the model's train/eval mode is restored. It runs eagerly, also when the
        model is compiled, so that a map modified in place later in the pass is
        caught here: maps captured while compiling cannot be checked."""
        with self._dry_run(batch), _eager(self.model), self.capture() as maps:
            output = self.model(batch)
        missing = [path for path in self.paths if path not in maps]
        if missing:
            raise ValueError(
                f"{self.role} modules {', '.join(map(repr, missing))} did not run in the "
                "forward pass (a dry run in eval mode); tap modules that run in every pass"
            )
        maps = {path: maps[path] for path in self.paths}  # reading checks for in-place changes
        return (maps, output) if return_output else maps

    @torch.no_grad()
    def train_mode_output(self, batch: Tensor) -> object:
        """The model's output on ``batch`` in train mode, which some models give
        in another form than in eval mode (Inception's auxiliary logits), found
        without training it: the plain model runs eagerly, and its buffers
        (BatchNorm's statistics), the random number generators (dropout) and
        each module's mode are as they were after. A batch of one sample runs
        twice over, as BatchNorm's train mode needs two; a tensor output is
        then the first sample's."""
        plain = unwrap(self.model)
        twice = len(batch) == 1
        buffers = {name: buffer.clone() for name, buffer in plain.named_buffers()}
        devices = [] if batch.device.type == "cpu" else [batch.device]
        try:
            with self._dry_run(batch, " in train mode"), torch.random.fork_rng(
                devices, device_type=batch.device.type
            ), _eager(plain, training=True):
                output = plain(torch.cat([batch, batch]) if twice else batch)
        finally:
            for name, buffer in plain.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        return output[:1] if twice and isinstance(output, Tensor) else output

    @contextmanager
    def _dry_run(self, batch: Tensor, mode: str = "") -> Iterator[None]:
        """A forward pass that checks the model: a failure says which model
        failed, and on what, before the error from deep inside it (most often
        an input the model cannot take, a RuntimeError from torch, or a user's
        forward raising its own). In a pass without gradient,
        torch.utils.checkpoint warns that no input requires grad: not shown."""
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "None of the inputs have requires_grad=True")
                yield
        except (FeatureTapError, _NotAFeatureMap):  # the taps' own errors name the module
            raise
        except Exception as exc:
            what = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
            raise RuntimeError(
                f"the {self.role} failed on a dry-run batch of shape {tuple(batch.shape)}{mode} "
                f"(is that the input it takes?): {what}"
            ) from exc

    def parameters_off_the_maps(self, batch: Tensor) -> set[str]:
        """Names (as in the plain model) of the trainable parameters that none of
        the tapped maps depends on, from one eager eval-mode forward and backward
        pass on ``batch``. A loss on the maps alone gives them no gradient: eager
        autograd leaves theirs None and optimisers skip them, but code compiled
        through AOT autograd fills it with zeros, and weight decay would then
        move them. Stages that train on the maps alone leave them out.

        A reentrant activation checkpoint (``use_reentrant=True``) refuses
        this pass: every parameter is then taken to be on the maps, as it
        would be without this search (eager autograd still leaves the others'
        gradients None)."""
        named = [(name, p) for name, p in unwrap(self.model).named_parameters() if p.requires_grad]
        # The backward pass too, in the same mode: activation checkpoints
        # recompute their segment in it.
        with torch.enable_grad(), _eager(self.model):
            with self.capture() as maps:
                self.model(batch)
            outputs = [maps[path] for path in self.paths if maps[path].requires_grad]
            if not outputs or not named:
                return {name for name, _ in named}
            try:
                gradients = torch.autograd.grad(
                    outputs,
                    [p for _, p in named],
                    grad_outputs=[torch.ones_like(output) for output in outputs],
                    allow_unused=True,
                )
            except RuntimeError as exc:
                # torch.autograd.backward() without inputs would work, but it
                # would fire the parameters' gradient hooks (DDP's all-reduce).
                if "use_reentrant" not in str(exc):
                    raise
                return set()
        return {name for (name, _), gradient in zip(named, gradients) if gradient is None}

    def _make_hook(self, path: str, features: FeatureMaps):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if not isinstance(output, Tensor) or output.dim() != 4:
                got = (
                    f"a tensor of shape {tuple(output.shape)}"
                    if isinstance(output, Tensor)
                    else f"a {type(output).__name__}"
                )
                raise _NotAFeatureMap(
                    f"{self.role} module {path!r} returned {got}; a tapped layer must give "
                    "a 4-D (N, C, H, W) feature map, so pick a convolutional layer"
                )
            features._store(path, output)

        return hook


def eval_mode(model: nn.Module) -> AbstractContextManager:
    """``model`` in eval mode for the block; each module's own mode is
    restored after (a model in training may hold frozen parts in eval)."""
    return _mode(model, training=False)


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model`` in train or eval mode for the block, set and restored through
    the model's own train(), which it may override; each module's own mode is
    restored after."""
    modes = [(module, module.training) for module in model.modules()]
    if all(was == training for _, was in modes):
        yield
        return
    model.train(training)
    try:
        yield
    finally:
        model.train(modes[0][1])
        for module, was in modes:
            module.training = was


@contextmanager
def _eager(model: nn.Module, training: bool = False) -> Iterator[None]:
    """``model`` in eval (or train) mode, and compiled models and modules run
    as the plain ones (hooks included); each module's mode is restored after."""
    with _mode(model, training), torch.compiler.set_stance("force_eager"):
        yield


class _NotAFeatureMap(TypeError):
    """A tapped module's output is no 4-D feature map."""


def _any_compiled(modules: Sequence[nn.Module]) -> bool:
    """Whether one of ``modules`` runs through torch.compile (``torch.compile(module)``
    or ``module.compile()``)."""
    # Read without nn.Module.__getattr__: this runs at every capture.
    return any(
        module.__dict__.get("_compiled_call_impl") is not None or "_orig_mod" in module._modules
        for module in modules
    )


def _guard_module_hooks(role: str) -> None:
    """Makes compiled code notice the taps' hooks. Dynamo does not guard on
    module hooks by default, so code it compiled for a model without hooks
    (the teacher evaluated before distillation) would keep running when the
    hooks are attached, and the tapped maps would never arrive. With the
    guards on, code compiled before is dropped once: it has none."""
    dynamo_config.skip_nnmodule_hook_guards = False
    torch.compiler.reset()
    warnings.warn(
        f"srm_ext: the {role} is compiled, and torch.compile does not notice forward "
        "hooks added to a model after it compiled it; the feature taps have set "
        "torch._dynamo.config.skip_nnmodule_hook_guards = False and cleared the "
        "compiled code once, so compiled models recompile on their next call",
        stacklevel=user_stacklevel(),
    )
