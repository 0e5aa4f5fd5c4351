"""How often the screened CUDA encode must fall back, modelled on the CPU.

    python benchmarks/screen_certification.py --shapes imagenet --out benchmarks/results

The screened encode (README, "CUDA encode") ranks every codeword with a TF32
GEMM, scores each pixel's best c candidates exactly, and certifies the
pixel when its exact k-th best beats the last candidate's TF32 score by more
than TF32's error bound; the other pixels are encoded again in full. How
large c must be is a property of the data, not of the GPU: this script
models the TF32 product (operands truncated to 10 mantissa bits, products
summed in float64; no subnormals arise here) and reports the fraction of
pixels left uncertified for several c, on synthetic low-rank ReLU feature
maps against the paper's random dictionary and against one trained briefly
on those maps (stage 1, the reference op).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from srm_ext import SparseRepresentation, reference
from srm_ext.benchmark import SHAPE_SETS, Shape


def tf32_truncated(t: torch.Tensor) -> torch.Tensor:
    """float32 with the 13 low mantissa bits cleared, as TF32 reads it."""
    bits = t.float().contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32)


def tf32_error_bound(depth: int, pixel_norms: torch.Tensor, codeword_norm_max: torch.Tensor) -> torch.Tensor:
    """The screened encode's bound on |TF32 score - exact score| (srm_kernels.h)."""
    relative, underflow = 2.0**-8 + depth * 2.0**-21, depth * 2.0**-125
    return relative * pixel_norms * codeword_norm_max + underflow * (pixel_norms + codeword_norm_max + 2)


def uncertified_fraction(rows: torch.Tensor, dictionary: torch.Tensor, intercept: float,
                         k: int, num_candidates: int) -> float:
    """Fraction of the (P, D) pixels `rows` whose top k the screen with
    num_candidates candidates cannot certify against the (D, K) dictionary.
    NaN and infinite scores never certify, as on the GPU."""
    depth = rows.shape[1]
    ranked = tf32_truncated(rows).double() @ tf32_truncated(dictionary).double() + intercept
    exact = rows.double() @ dictionary.double() + intercept
    candidates = ranked.topk(num_candidates, dim=1).indices
    cutoff = ranked.gather(1, candidates[:, -1:])
    kth_best = exact.gather(1, candidates).topk(k, dim=1).values[:, -1:]
    bound = tf32_error_bound(depth, rows.double().norm(dim=1, keepdim=True),
                             dictionary.double().norm(dim=0).max())
    certified = (kth_best - cutoff) > bound  # False for NaN
    return 1.0 - certified.double().mean().item()


def candidate_counts(k: int, num_codewords: int) -> list[int]:
    """c from k + 1 up, the encode's own choice k + max(k, 8) among them;
    only those that leave codewords out."""
    counts = {k + 1, k + 2, k + 4, k + 8, 2 * k, k + max(k, 8)}
    return sorted(c for c in counts if k < c < min(num_codewords, 129))


def feature_maps(batch: int, basis: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, D, size, size) ReLU maps of rank basis.shape[0] plus an offset:
    non-negative and correlated across channels, as a CNN's are."""
    codes = torch.randn(batch, basis.shape[0], size, size, generator=generator)
    return torch.relu(torch.einsum("nrhw,rd->ndhw", codes, basis) + 0.3)


def study_shape(shape: Shape, pixels: int, train_steps: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d, K, k = shape.channels, shape.num_codewords, shape.k
    rank = max(1, d // 4)
    basis = torch.randn(rank, d, generator=g) / rank**0.5
    size = min(shape.height, 8)
    block = SparseRepresentation(d, K, k)
    def snapshot() -> tuple[torch.Tensor, float]:
        return block.dictionary.detach().clone(), float(block.intercept.detach())

    dictionaries = {"random": snapshot()}
    if train_steps > 0:
        optimiser = torch.optim.Adam(block.parameters(), lr=1e-3)
        for _ in range(train_steps):
            x = feature_maps(16, basis, size, g)
            loss = reference.reconstruction_loss(x, block.dictionary, block.intercept, k)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        dictionaries["trained"] = snapshot()
    batch = -(-pixels // (size * size))
    rows = feature_maps(batch, basis, size, g).permute(0, 2, 3, 1).reshape(-1, d)[:pixels]
    return [
        {"shape": shape.name, "D": d, "K": K, "k": k, "dictionary": name, "candidates": c,
         "chosen": c == min(k + max(k, 8), 128), "pixels": rows.shape[0],
         "uncertified": uncertified_fraction(rows, C, intercept, k, c)}
        for name, (C, intercept) in dictionaries.items()
        for c in candidate_counts(k, K)
    ]


def markdown_table(records: list[dict]) -> str:
    lines = ["| shape (D, K, k) | dictionary | candidates c | uncertified pixels |",
             "|---|---|---:|---:|"]
    for r in records:
        c = f"**{r['candidates']}**" if r["chosen"] else str(r["candidates"])
        lines.append(f"| {r['shape']} ({r['D']}, {r['K']}, {r['k']}) | {r['dictionary']} | {c} | "
                     f"{100 * r['uncertified']:.2f}% of {r['pixels']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="imagenet")
    parser.add_argument("--pixels", type=int, default=8192, help="pixels sampled per shape")
    parser.add_argument("--train-steps", type=int, default=150,
                        help="Adam steps of stage 1 for the trained dictionary (0: random only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for screen-certification-<shapes>.{json,md}")
    args = parser.parse_args(argv)
    if args.pixels < 1 or args.train_steps < 0:
        parser.error("--pixels must be >= 1 and --train-steps >= 0")
    records = [r for shape in SHAPE_SETS[args.shapes]
               for r in study_shape(shape, args.pixels, args.train_steps, args.seed)]
    table = markdown_table(records)
    print(table, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"screen-certification-{args.shapes}"
        stem.with_suffix(".json").write_text(json.dumps(
            {"pixels": args.pixels, "train_steps": args.train_steps, "seed": args.seed,
             "torch": torch.__version__, "records": records}, indent=1) + "\n")
        stem.with_suffix(".md").write_text(
            "Uncertified pixels of the screened encode by candidate count c, modelled on the "
            "CPU (benchmarks/screen_certification.py); the encode's own c in bold.\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
