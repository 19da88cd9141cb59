"""Mutation check: do the tests see each algorithm's mechanisms?

Each mutation (benchmarks/mutants/<algo>.py, a list MUTATIONS of `Mutation`) replaces one exact snippet
of algorithms/, models/ or the simulator's training and evaluation code in bench/ (it must occur exactly
once) in a temporary copy of the repository, then runs that algorithm's tests on the copy. A mutation is
*killed* when a test fails, *survived* when all pass. Target: every mutation killed. A mutation found to
preserve behaviour is removed from its list with a one-line reason (in the list's comments), never kept as
a survivor.

    .venv/bin/python -m benchmarks.mutation_check                 # all (about 15-30 min on 2 cores)
    .venv/bin/python -m benchmarks.mutation_check --algo fedkd    # one algorithm's mutations
    .venv/bin/python -m benchmarks.mutation_check --jobs 2 --out benchmarks/results

Writes mutations.md and mutations.json into --out (default benchmarks/results/). Not part of the default
test run (it runs the algorithm test files once per mutation).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("algorithms", "bench", "data", "models", "reports", "tests", "benchmarks", "pyproject.toml")


@dataclass(frozen=True)
class Mutation:
    name: str             # what the mutation breaks, e.g. "pfedlora: skip loading the downloaded adapter"
    file: str             # path relative to the repository root
    old: str              # exact snippet, present exactly once in `file`
    new: str              # its replacement
    tests: tuple[str, ...]  # test files (or node ids) that must catch it


def all_mutations(algos: list[str] | None = None) -> list[Mutation]:
    import benchmarks.mutants as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if algos and info.name not in algos:
            continue
        found.extend(importlib.import_module(f"benchmarks.mutants.{info.name}").MUTATIONS)
    return found


def check_applicable(m: Mutation) -> None:
    text = (ROOT / m.file).read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"error: mutation {m.name!r}: snippet occurs {count} times in {m.file} (must be once)")


def run_one(m: Mutation, timeout: float) -> dict:
    """Apply `m` to a fresh copy of the repository and run its tests there."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
            else:
                shutil.copy2(src, Path(tmp) / name)
        target = Path(tmp) / m.file
        target.write_text(target.read_text().replace(m.old, m.new, 1))
        env = {**os.environ, "PYTHONPATH": tmp, "OMP_NUM_THREADS": "1", "MUTATION_CHECK": "1"}
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *m.tests], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            outcome = "survived" if proc.returncode == 0 else ("killed" if proc.returncode == 1 else "error")
            last = (proc.stdout.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            outcome, last = "killed (timeout)", f"no result within {timeout:.0f} s"
        return {**asdict(m), "outcome": outcome, "seconds": round(time.perf_counter() - start, 1), "pytest": last}


def write_report(results: list[dict], out: Path) -> str:
    killed = sum(r["outcome"].startswith("killed") for r in results)
    survived = [r for r in results if r["outcome"] == "survived"]
    errors = [r for r in results if r["outcome"] == "error"]
    lines = ["# Mutation check", "",
             f"{len(results)} mutations of algorithms/, models/, the shared training path (algorithms/base.py's Phase, "
             f"bench/training.py) and the evaluation (bench/context.py, bench/simulator.py), each applied alone to a copy of the repository "
             f"and tested with its algorithm's tests (`python -m benchmarks.mutation_check`).", "",
             f"Killed: {killed}/{len(results)}; survived: {len(survived)} "
             f"(survival rate {len(survived) / max(len(results), 1):.1%}); errors: {len(errors)}.", "",
             "| mutation | file | outcome | tests | s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['file']} | {r['outcome']} | {' '.join(r['tests'])} | {r['seconds']} |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutations.md").write_text(text)
    (out / "mutations.json").write_text(json.dumps(results, indent=1) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", action="append", help="only this algorithm's mutations (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="mutations tested in parallel")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    mutations = all_mutations(args.algo)
    for m in mutations:
        check_applicable(m)
    print(f"{len(mutations)} mutations, {args.jobs} at a time", flush=True)

    def report(m: Mutation) -> dict:
        result = run_one(m, args.timeout)
        print(f"  {result['outcome']:<16} {m.name}  ({result['seconds']} s)", flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(report, mutations))
    print(write_report(results, args.out))
    return 0 if all(r["outcome"].startswith("killed") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
