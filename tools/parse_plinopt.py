"""Turn PLinOpt's rank-48 4×4 matmul scheme (SMS files) into the shipped ``dps48`` bases.

    .venv/bin/python tools/parse_plinopt.py            # every variant whose files are present

Source: J.-G. Dumas, C. Pernet, A. Sedoglavic, "A non-commutative algorithm for multiplying
4×4 matrices using 48 non-complex multiplications", arXiv:2506.13242 (2025); data files from
https://github.com/jgdumas/plinopt (CeCILL-B licence), copied verbatim into
``stl_compiler/data/plinopt/`` (commits in ``stl_compiler/data/README.md``).

SMS format: an optional ``#`` comment line, a header ``rows cols X``, then 1-based
``i j value`` lines (values are integers or fractions such as ``-1/8``), ending ``0 0 0``.
A scheme is three matrices with vec(C) = P · ((L · vec A) ⊙ (R · vec B)) for C = A · B, all
vectors row-major; L, R are (48, 16) and P is (16, 48). Our convention (``stl_compiler.bases``)
is vec(X @ W) = d.T @ ((ex @ vec X) * (ew @ vec W)), so ex = L, ew = R, d = P.T.
Some variants are stored factored (``_ALT`` · ``_CoB``): each matrix is then the exact product
of the listed factors. Every scheme is checked exact in rational arithmetic before writing.
"""

from __future__ import annotations

import argparse
import os
from fractions import Fraction

import torch

from stl_compiler.bases import STLBasis

Matrix = list[list[Fraction]]

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
DATA = os.path.join(ROOT, "stl_compiler", "data")
SOURCE = os.path.join(DATA, "plinopt")
REPOSITORY = "https://github.com/jgdumas/plinopt"
PAPER = ("J.-G. Dumas, C. Pernet, A. Sedoglavic, A non-commutative algorithm for multiplying "
         "4x4 matrices using 48 non-complex multiplications, arXiv:2506.13242 (2025), "
         "hal-05112145")
LICENCE = "CeCILL-B (BSD-like; attribution required)"

# variant -> (commit, {matrix: the factors whose product it is, left to right})
VARIANTS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "rational": ("ce344f98457e0ac2995b20b1c9eb6365d74696dd", {
        m: (f"4x4x4_48_rational_{m}.sms",) for m in "LRP"}),
    "accurate": ("2dfd708c4f92f1cdb5d7cd2390127d0df9016b71", {
        "L": ("4x4x4_48_355_rational_accurate_ALT_L.sms",
              "4x4x4_48_355_rational_accurate_CoB_L.sms"),
        "R": ("4x4x4_48_355_rational_accurate_ALT_R.sms",
              "4x4x4_48_355_rational_accurate_CoB_R.sms"),
        "P": ("4x4x4_48_355_rational_accurate_CoB_P.sms",
              "4x4x4_48_355_rational_accurate_ALT_P.sms")}),
}


def read_sms(path: str) -> Matrix:
    """A dense matrix of Fractions from an SMS file (see the module docstring)."""
    with open(path) as handle:
        lines = [line.split() for line in handle if line.strip() and not line.startswith("#")]
    if not lines or len(lines[0]) != 3:
        raise ValueError(f"{path}: expected a header 'rows cols type', got {lines[:1]}")
    rows, cols = int(lines[0][0]), int(lines[0][1])
    matrix = [[Fraction(0)] * cols for _ in range(rows)]
    for number, entry in enumerate(lines[1:], start=2):
        if len(entry) != 3:
            raise ValueError(f"{path}: line {number} is not 'i j value': {' '.join(entry)}")
        i, j, value = int(entry[0]), int(entry[1]), Fraction(entry[2])
        if (i, j) == (0, 0):
            return matrix
        if not (1 <= i <= rows and 1 <= j <= cols):
            raise ValueError(f"{path}: entry ({i}, {j}) outside a {rows}x{cols} matrix")
        matrix[i - 1][j - 1] += value
    raise ValueError(f"{path}: no terminating '0 0 0' line")


def product(factors: list[Matrix]) -> Matrix:
    """Exact product of rational matrices, left to right."""
    out = factors[0]
    for right in factors[1:]:
        if len(out[0]) != len(right):
            raise ValueError(f"cannot multiply a {len(out)}x{len(out[0])} factor by a "
                             f"{len(right)}x{len(right[0])} one")
        cols = list(zip(*right))
        out = [[sum((a * b for a, b in zip(row, col)), Fraction(0)) for col in cols]
               for row in out]
    return out


def check_exact(L: Matrix, R: Matrix, P: Matrix, tile: int = 4) -> None:
    """Raise unless P·((L·vec A) ⊙ (R·vec B)) = vec(A·B) exactly (Brent equations)."""
    t = tile
    tensor: dict[tuple[int, int, int], Fraction] = {}
    for p in range(len(L)):  # sparse: only the nonzero coefficients of each product term
        left = [(a, v) for a, v in enumerate(L[p]) if v]
        right = [(b, v) for b, v in enumerate(R[p]) if v]
        out = [(c, row[p]) for c, row in enumerate(P) if row[p]]
        for a, u in left:
            for b, v in right:
                for c, w in out:
                    tensor[a, b, c] = tensor.get((a, b, c), Fraction(0)) + u * v * w
    for a in range(t * t):
        for b in range(t * t):
            for c in range(t * t):
                got = tensor.get((a, b, c), Fraction(0))
                want = int(a % t == b // t and a // t == c // t and b % t == c % t)
                if got != want:
                    raise ValueError(f"not an exact scheme: tensor entry ({a}, {b}, {c}) is "
                                     f"{got}, should be {want}")


def to_basis(L: Matrix, R: Matrix, P: Matrix, name: str) -> STLBasis:
    """The STL basis ex = L, ew = R, d = Pᵀ (float64; the coefficients are dyadic, so exact)."""
    def tensor(m: Matrix) -> torch.Tensor:
        return torch.tensor([[float(v) for v in row] for row in m], dtype=torch.float64)

    ex, ew, d = tensor(L), tensor(R), tensor(P).T
    return STLBasis(4, ex.shape[0], ex, ew, d, name=name, alpha=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                        help="default: every variant whose files are in stl_compiler/data/plinopt")
    args = parser.parse_args()
    for variant in args.variants or sorted(VARIANTS):
        commit, files = VARIANTS[variant]
        paths = {m: [os.path.join(SOURCE, f) for f in names] for m, names in files.items()}
        missing = [p for ps in paths.values() for p in ps if not os.path.exists(p)]
        if missing:
            if args.variants:
                raise FileNotFoundError(f"variant {variant!r} needs {missing}")
            print(f"skip {variant}: missing {missing}")
            continue
        L, R, P = (product([read_sms(p) for p in paths[m]]) for m in "LRP")
        check_exact(L, R, P)
        basis = to_basis(L, R, P, name=f"dps48-{variant}")
        out = os.path.join(DATA, f"dps48_t4_{variant}.safetensors")
        sources = "; ".join(f"{m} = " + " * ".join(f"data/{f}" for f in names)
                            for m, names in files.items())
        basis.save(out, metadata={
            "source_paper": PAPER, "source_repository": REPOSITORY, "source_commit": commit,
            "source_files": sources, "licence": LICENCE,
            "conversion": "ex = L, ew = R, d = P^T (tools/parse_plinopt.py)"})
        os.chmod(out, 0o644)
        coefficients = sorted({abs(v) for m in (L, R, P) for row in m for v in row} - {0})
        print(f"{variant}: exact rank-{basis.rank} scheme, |coefficients| in "
              f"{[str(c) for c in coefficients]} -> {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
