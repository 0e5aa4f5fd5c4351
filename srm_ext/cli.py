"""Command line: ``python -m srm_ext {distill,bench,info}`` (also ``srm-ext``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .distill.config import error_line
from .distill.hooks import FeatureTapError

__all__ = ["main", "build_parser"]

PROG = "srm-ext"
# Errors that mean bad input (flags, paths, data files, a diverging run, a
# layer that cannot be tapped): one line and exit code 2, the traceback only
# with --debug. OSError covers the file-system cases and images Pillow cannot read.
USER_ERRORS = (
    ValueError, TypeError, OSError, FloatingPointError, zipfile.BadZipFile, FeatureTapError
)


def _csv(kind):
    def parse(text: str) -> list:
        try:
            items = [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            items = []
        if not items:  # "" or ",," would otherwise stand for the default without a word
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    from .distill.config import AMP_MODES, METHODS, PRESETS
    from .distill.models import ARCHITECTURES

    parser = argparse.ArgumentParser(
        prog=PROG, description="Sparse Representation Matching (SRM) knowledge distillation."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = commands.add_parser(
        "distill",
        help="train a teacher, then students with each method over seeds; report accuracy",
        description=(
            "Train a teacher, then students by each method over several seeds, and print "
            "held-out accuracy (mean ± std) with the time of each stage. Without arguments: "
            "scikit-learn's digits, DenseNet teacher, AllCNN student, scratch/kd/srm, 3 seeds. "
            "Under torchrun the work is spread over the processes (DDP, gloo or NCCL)."
        ),
    )
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks on errors")
    d.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="bundle of settings; explicit flags override it (default: default)")
    g = d.add_argument_group("data")
    g.add_argument("--dataset", choices=["digits", "cifar10", "cifar100", "imagefolder", "npz"])
    g.add_argument("--data-path", help="CIFAR python folder, ImageFolder root or .npz file")
    g.add_argument("--image-size", type=int, metavar="S",
                   help="resize the images to SxS (default: digits 8, imagefolder 32, CIFAR and "
                   "npz as stored)")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="disable random translations/flips")
    g.add_argument("--no-flip", dest="flip", action="store_false", default=None,
                   help="keep the translations but disable the horizontal flips that 3-channel "
                        "images get (for text, digits, signs: whatever a mirror changes)")
    g.add_argument("--check-images", action="store_true", default=None,
                   help="read every image of an image tree before training, and list those "
                        "that cannot be read (else a run stops at the first, when it is drawn)")
    g.add_argument("--train-limit", type=int,
                   help="use only N training samples, spread evenly over the training split")
    g.add_argument("--test-limit", type=int,
                   help="use only N held-out samples, spread evenly over the held-out split")
    g.add_argument("--input-mean", type=_csv(float), metavar="M,...",
                   help="channel means that inputs in [0, 1] are normalised with "
                        "(default: the training split's)")
    g.add_argument("--input-std", type=_csv(float), metavar="S,...",
                   help="channel stds, likewise; e.g. a teacher trained on ImageNet wants "
                        "0.229,0.224,0.225 with --input-mean 0.485,0.456,0.406")
    g = d.add_argument_group("models")
    own = "or package.module:function, called as function(num_classes, in_channels, width)"
    g.add_argument("--teacher", help=f"teacher architecture: {', '.join(ARCHITECTURES)}, {own}")
    g.add_argument("--student", help=f"student architecture: {', '.join(ARCHITECTURES)}, {own}")
    g.add_argument("--teacher-width", type=float, help="channel width multiplier")
    g.add_argument("--student-width", type=float, help="channel width multiplier")
    g.add_argument("--layer-pairs", type=_csv(str), metavar="T:S,...",
                   help="teacher:student module paths (default: the architectures' stages)")
    g.add_argument("--teacher-weights", metavar="PATH",
                   help="load the teacher instead of training it: a state dict of --teacher, "
                        "or an earlier run's output directory (its models/teacher.pt)")
    g = d.add_argument_group("SRM and baselines")
    g.add_argument("--codeword-multiplier", type=float, help="K = int(D * cm)")
    g.add_argument("--sparsity-multiplier", type=float, help="k = max(1, int(D * sm * cm))")
    g.add_argument("--local-weight", type=float, help="weight of the pixel-level loss")
    g.add_argument("--global-weight", type=float, help="weight of the image-level loss")
    g.add_argument("--kd-temperature", type=float)
    g.add_argument("--kd-alpha", type=float, help="weight of the soft (KL) term")
    g.add_argument("--fitnet-weight", type=float)
    g.add_argument("--sp-weight", type=float)
    g.add_argument("--at-weight", type=float,
                   help="default: the paper's 1000")
    g = d.add_argument_group("schedule")
    g.add_argument("--methods", type=_csv(str), metavar="M,...",
                   help=f"any of {','.join(METHODS)} (default: scratch,kd,srm)")
    g.add_argument("--seeds", type=_csv(int), metavar="S,...", help="student seeds, e.g. 0,1,2")
    g.add_argument("--teacher-seed", type=int, help="seed of the one teacher all students share")
    g.add_argument("--epochs-teacher", type=int)
    g.add_argument("--epochs-dictionary", type=int, help="SRM stage 1")
    g.add_argument("--epochs-init", type=int, help="SRM stage 2 and FitNet's hint stage")
    g.add_argument("--epochs-student", type=int, help="KD stage and the single-stage methods")
    g.add_argument("--batch-size", type=int, help="global batch (split across processes)")
    g.add_argument("--accumulate-steps", type=int,
                   help="batches whose gradients are summed into one optimiser step")
    g.add_argument("--lr", type=float, help="teacher, KD and baseline stages")
    g.add_argument("--lr-srm", type=float, help="SRM stages 1-2 and FitNet's hint stage")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--max-grad-norm", type=float,
                   help="clip the gradients' total norm to this before each step (default: off)")
    g.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    g.add_argument("--momentum", type=float, help="sgd only: Nesterov momentum (0: plain SGD)")
    g.add_argument("--schedule", choices=["none", "step", "cosine"],
                   help="per-epoch lr schedule of the teacher/KD/baseline stages")
    g.add_argument("--milestones", type=_csv(float), metavar="F,...",
                   help="step schedule: fractions of a stage's epochs where the lr drops")
    g.add_argument("--gamma", type=float, help="step schedule: lr factor at each milestone")
    g = d.add_argument_group("runtime")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", choices=AMP_MODES, help="autocast dtype")
    g.add_argument("--output-dir", help="where config, metrics, results, plots and checkpoints go")
    g.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    g.add_argument("--threads", type=int, help="torch intra-op threads per process (default on CPU: half the cores)")
    # --no-quiet and --no-compile too, so that a resume can turn off what the
    # saved config turned on.
    g.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=None,
                   help="no progress bars or epoch lines")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the teacher and students through torch.compile (meant for "
                        "GPUs; compiling takes minutes; default: off)")
    existing = g.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    existing.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")

    _document_defaults(d)

    commands.add_parser(
        "bench", help="benchmark the SRM ops (arguments go to srm_ext.benchmark)", add_help=False
    )
    commands.add_parser("info", help="show which compiled backends are available (JSON)")
    return parser


def _document_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ExperimentConfig's default to each flag's help (the flags themselves
    default to None so that presets and saved configs can fill them)."""
    from .distill.config import ExperimentConfig

    defaults = ExperimentConfig().to_dict()
    for action in parser._actions:
        value = defaults.get(action.dest)
        if value is not None and not isinstance(value, bool) and "default:" not in (action.help or ""):
            if isinstance(value, list):
                value = ",".join(map(str, value))
            action.help = f"{action.help or ''} (default: {value})".strip()


# Flags that are not ExperimentConfig fields.
_CONTROL_FLAGS = ("command", "debug", "preset", "resume", "overwrite")
# Flags read only under one value of another setting: given without it, the
# run would not do what they ask.
_CONDITIONAL_FLAGS = {
    "milestones": ("schedule", "step"),
    "gamma": ("schedule", "step"),
    "momentum": ("optimizer", "sgd"),
}
# Flags read only by some methods (the epoch counts aside, which runs tend to
# set together). A sweep may pass them to every run, so their absence from
# --methods is a warning, not an error.
_METHOD_FLAGS = {
    "kd_temperature": ("kd", "fitnet", "srm"),
    "kd_alpha": ("kd", "fitnet", "srm"),
    "lr_srm": ("fitnet", "srm"),
    "fitnet_weight": ("fitnet",),
    "sp_weight": ("sp",),
    "at_weight": ("at",),
    "codeword_multiplier": ("srm",),
    "sparsity_multiplier": ("srm",),
    "local_weight": ("srm",),
    "global_weight": ("srm",),
}


def build_config(args: argparse.Namespace) -> Any:
    """ExperimentConfig from defaults < saved config (on --resume) < preset < flags."""
    from .distill.config import ExperimentConfig, PRESETS
    from .distill.experiment import ExperimentRunner

    values: dict[str, Any] = ExperimentConfig().to_dict()
    flags = {
        k: v for k, v in vars(args).items() if k not in _CONTROL_FLAGS and v is not None
    }
    if args.resume:
        saved = ExperimentRunner.saved_config(flags.get("output_dir", values["output_dir"]))
        if saved is not None:
            values.update(saved)
    if args.preset is not None or not args.resume:
        preset = args.preset or "default"
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update(flags)
    config = ExperimentConfig.from_dict(values)
    _check_flags_are_read(flags, config)
    return config


def _check_flags_are_read(flags: dict[str, Any], config: Any) -> None:
    """Refuses flags the run would ignore because of another setting; warns
    (once, from rank 0) about flags none of the chosen methods reads."""
    from .distill.config import ConfigError, PAIRED_METHODS

    for name, (setting, needed) in _CONDITIONAL_FLAGS.items():
        if name in flags and getattr(config, setting) != needed:
            raise ConfigError(
                f"--{_flag(name)} applies to --{setting} {needed} only; this run's {setting} "
                f"is {getattr(config, setting)}"
            )
    if not _is_rank_zero():
        return
    for name, readers in {**_METHOD_FLAGS, "layer_pairs": PAIRED_METHODS}.items():
        if name in flags and not set(readers) & set(config.methods):
            print(
                f"{PROG}: warning: --{_flag(name)} is not used by --methods "
                f"{','.join(config.methods)}; it applies to {', '.join(readers)}",
                file=sys.stderr,
            )


def _is_rank_zero() -> bool:
    """Whether this process speaks for the run: the only one, or torchrun's rank 0
    (read from the environment: the CLI talks before and after the process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def _flag(name: str) -> str:
    return name.replace("_", "-")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Schedulers preempt jobs with SIGTERM: stop as on Ctrl-C, so temporary
    files are removed and the resume command is printed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _distill(args: argparse.Namespace) -> int:
    from .distill.experiment import ExperimentRunner

    config = build_config(args)
    if ":" in config.teacher or ":" in config.student:
        _import_from_working_directory()
    runner = ExperimentRunner(config, resume=args.resume, overwrite=args.overwrite)
    try:
        with _sigterm_as_interrupt():
            runner.run()
    except KeyboardInterrupt:
        if _is_rank_zero():
            if runner.resumable:
                advice = (
                    f"continue with: {_invocation()} distill --resume "
                    f"--output-dir {shlex.quote(config.output_dir)}"
                )
            else:
                advice = "the run had saved nothing yet; start it again with the same command"
            print(f"\n{PROG}: interrupted; {advice}", file=sys.stderr)
        return 130
    return 0


def _import_from_working_directory() -> None:
    """A model named package.module:function is found in the working directory
    as ``python -m`` finds it, also under the srm-ext script."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _invocation() -> str:
    """How this command was started: the srm-ext script, python -m srm_ext, or
    torchrun, whose process count a resume must repeat to match the run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if local == world:
            return f"torchrun --nproc_per_node={world} -m srm_ext"
        return "torchrun (with this run's options) -m srm_ext"
    if sys.argv and Path(sys.argv[0]).name == "__main__.py":
        return "python -m srm_ext"
    return PROG


def _bench(argv: Sequence[str]) -> int:
    try:
        from . import benchmark
    except ImportError as exc:
        print(f"{PROG}: error: the benchmark module is not available ({exc})", file=sys.stderr)
        return 2
    return int(benchmark.main(list(argv)) or 0)


def _info() -> int:
    from . import backend_info

    print(json.dumps(backend_info(), indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m srm_ext`` and the ``srm-ext`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench` owns all of its arguments, including -h.
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info()
        if args.command == "bench":
            return _bench([])
        return _distill(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if args.debug:
            raise
        if _out_of_memory(exc):
            print(
                f"{PROG}: error: out of memory ({_allocation(exc)}); use a smaller --batch-size, "
                "--image-size, --teacher-width or --student-width",
                file=sys.stderr,
            )
            return 2
        if _peer_stopped(exc):
            # The process that stopped printed why; a traceback here would bury it.
            print(
                f"{PROG}: error: another process of the run stopped (see its error); "
                f"this one left the collective it was in ({error_line(exc)})",
                file=sys.stderr,
            )
            return 2
        raise


def _out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, torch's (CUDA) OutOfMemoryError, or the
    RuntimeError of torch's CPU allocator."""
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in str(exc)
    )


# How gloo and NCCL report a collective whose peer process has exited.
_PEER_STOPPED = re.compile(
    r"Connection (closed|reset) by peer|remote worker crashing|NCCL communicator was aborted"
)


def _peer_stopped(exc: BaseException) -> bool:
    """A collective failed because another process of a torchrun group stopped."""
    world = os.environ.get("WORLD_SIZE", "1")
    return world.isdigit() and int(world) > 1 and bool(_PEER_STOPPED.search(str(exc)))


def _allocation(exc: BaseException) -> str:
    """What the failed allocation asked for, briefly."""
    found = re.search(r"tried to allocate (\d+) bytes", str(exc))
    if found:
        return f"{int(found.group(1)) / 2**30:,.1f} GiB requested"
    return error_line(exc) if str(exc) else type(exc).__name__
