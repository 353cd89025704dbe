"""CPU time of `nnunet-ext --help` and of every `nnunet-ext CMD [SUB] --help` (issue 18: target < 0.5 s on the
2-core machine; none may import torch, which tests/test_cli_help.py checks).

    python benchmarks/bench_cli_help.py [--repeats 5]

Each call runs in a fresh process (the console script's interpreter, `python -m nnunet_ext.cli` equivalent);
the median of the child's user+system CPU time and wall time are printed per command, then the slowest."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def command_paths() -> list[list[str]]:
    from nnunet_ext.cli import COMMANDS, build_parser

    paths = [[]]
    for name in COMMANDS:
        top = build_parser(name)
        stack = [
            ([name], next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices[name])
        ]
        while stack:
            path, parser = stack.pop()
            paths.append(path)
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack += [([*path, n], c) for n, c in action.choices.items()]
    return paths


def measure(path: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from nnunet_ext.cli import main; sys.exit(main(sys.argv[1:]))",
            *path,
            "--help",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for path in command_paths():
        runs = [measure(path) for _ in range(args.repeats)]
        cpu, wall = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        rows.append((cpu, wall, " ".join(["nnunet-ext", *path, "--help"])))
        print(f"{cpu:6.3f} s cpu  {wall:6.3f} s wall  {rows[-1][2]}", flush=True)
    cpu, wall, name = max(rows)
    print(f"slowest: {name}: {cpu:.3f} s CPU, {wall:.3f} s wall (target < 0.5 s)")


if __name__ == "__main__":
    main()
