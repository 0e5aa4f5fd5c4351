"""Rewrites CUDA sources into C++ that builds against the CPU emulator.

Four constructs have no C++ spelling and are rewritten, and one is checked:

* ``kernel<<<grid, block, bytes, stream>>>(args)`` becomes
  ``::cuda_emulator::launch(kernel, ::cuda_emulator::LaunchConfig(grid, block,
  bytes, stream), args)``;
* ``__shared__ T name[...];`` becomes a function-static array registered with
  the emulator, which poisons it before every block;
* ``extern __shared__ T name[];`` becomes a pointer to the launch's dynamic
  shared memory;
* ``__launch_bounds__(max_threads, ...)`` on a kernel becomes a check at the
  top of its body, which fails the launch of a larger block as a GPU does;
* ``reinterpret_cast<T*>`` to a CUDA vector type (``float2``, ``float4``,
  ``int4``) becomes ``::cuda_emulator::vector_cast<T*>``, which fails the
  kernel on a misaligned address as a GPU's wide access does.

Everything else compiles as is with the headers in ``include/``, which must
come before any real CUDA include directory. ``.cu`` files are written as
``.cpp``, headers keep their names.

    python translate.py SOURCE_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<>]+)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(
    r"__shared__\s+((?:__align__\(\d+\)\s+)?[\w:<>, ]+?)\s+(\w+)((?:\s*\[[^\]]+\])*)\s*;"
)
_IDENTIFIER_CHAR = re.compile(r"[\w:]")
_LAUNCH_BOUNDS = "__launch_bounds__("
_KERNEL_NAME = re.compile(r"\s*\w+\s*\(")
_BODY_OPEN = re.compile(r"\s*\{")
_VECTOR_CAST = re.compile(r"\breinterpret_cast<(\s*(?:const\s+)?(?:float2|float4|int4)\s*\*\s*)>")


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes text[start] == open_."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_!r} at offset {start}")


def _callee_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends just before `end`: a name,
    possibly qualified, possibly with template arguments."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and _IDENTIFIER_CHAR.match(text[i - 1]):
        i -= 1
    return i


def rewrite_launches(text: str) -> str:
    out = []
    pos = 0
    while (open_at := text.find("<<<", pos)) >= 0:
        start = _callee_start(text, open_at)
        callee = text[start:open_at].strip()
        close_at = text.index(">>>", open_at)
        config = text[open_at + 3 : close_at]
        args_open = text.index("(", close_at)
        args_close = _matching(text, args_open, "(", ")")
        args = text[args_open + 1 : args_close - 1].strip()
        out.append(text[pos:start])
        out.append(
            f"::cuda_emulator::launch({callee}, ::cuda_emulator::LaunchConfig({config})"
            + (f", {args})" if args else ")")
        )
        pos = args_close
    out.append(text[pos:])
    return "".join(out)


def _first_argument(arguments: str) -> str:
    """The first of comma-separated arguments, commas inside brackets
    (template argument lists included) kept."""
    depth = 0
    for i, char in enumerate(arguments):
        if char in "(<[":
            depth += 1
        elif char in ")>]":
            depth -= 1
        elif char == "," and depth == 0:
            return arguments[:i].strip()
    return arguments.strip()


def rewrite_launch_bounds(text: str) -> str:
    out = []
    pos = 0
    while (at := text.find(_LAUNCH_BOUNDS, pos)) >= 0:
        bounds_end = _matching(text, at + len(_LAUNCH_BOUNDS) - 1, "(", ")")
        name = _KERNEL_NAME.match(text, bounds_end)
        params_end = _matching(text, name.end() - 1, "(", ")") if name else bounds_end
        body = _BODY_OPEN.match(text, params_end)
        if body is None:  # not on a kernel definition: the header's macro drops it
            out.append(text[pos:bounds_end])
            pos = bounds_end
            continue
        max_threads = _first_argument(text[at + len(_LAUNCH_BOUNDS) : bounds_end - 1])
        body = body.end()
        out.append(text[pos:at])
        out.append(text[bounds_end:body])
        out.append(f" ::cuda_emulator::check_launch_bounds({max_threads});")
        pos = body
    out.append(text[pos:])
    return "".join(out)


def rewrite_shared(text: str) -> str:
    text = _DYNAMIC_SHARED.sub(
        lambda m: f"{m[1]}* {m[2]} = static_cast<{m[1]}*>(::cuda_emulator::dynamic_shared_memory());",
        text,
    )

    def static_array(m: re.Match) -> str:
        decl, name, dims = m[1], m[2], m[3]
        align = re.match(r"__align__\((\d+)\)\s+", decl)
        prefix = f"alignas({align[1]}) static" if align else "static"
        decl = decl[align.end() :] if align else decl
        return (
            f"{prefix} {decl} {name}{dims}; "
            f"::cuda_emulator::track_shared(&{name}, sizeof({name}));"
        )

    return _STATIC_SHARED.sub(static_array, text)


def rewrite_vector_casts(text: str) -> str:
    return _VECTOR_CAST.sub(r"::cuda_emulator::vector_cast<\1>", text)


def translate(text: str) -> str:
    return rewrite_launches(rewrite_shared(rewrite_launch_bounds(rewrite_vector_casts(text))))


def translate_file(path: Path, out_dir: Path) -> Path | None:
    """Writes the translation of a .cu or .cuh file into out_dir and returns
    its path (None for other files). An unchanged translation is not
    rewritten, so that builds depending on it stay up to date."""
    if path.suffix not in (".cu", ".cuh"):
        return None
    target = out_dir / (path.stem + ".cpp" if path.suffix == ".cu" else path.name)
    text = translate(path.read_text())
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.source_dir.iterdir()):
        translate_file(path, args.out_dir)


if __name__ == "__main__":
    main()
