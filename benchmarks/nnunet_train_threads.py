"""``nnUNetv2_train`` (nnU-Net's own entry point, same arguments) that keeps OMP_NUM_THREADS torch threads.

    OMP_NUM_THREADS=1 python benchmarks/nnunet_train_threads.py 930 3d_tiny 0 -tr nnUNetTrainer_converge -device cpu

``nnUNetv2_train -device cpu`` calls ``torch.set_num_threads(multiprocessing.cpu_count())`` whatever
OMP_NUM_THREADS says. Two CPU trainings side by side on a 2-core machine then run four compute threads on two
cores, and each step took ~5x as long as with one thread each (2026-12-03: 147 s instead of 27 s per 60-step
epoch of 3d_tiny; py-spy showed both threads of each process busy). The benchmarks that share a machine between
runs (``converge.py``) start the training through this file instead: the one call is held to OMP_NUM_THREADS,
everything else is ``nnUNetv2_train``.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    import torch
    from nnunetv2.run.run_training import run_training_entry

    threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    if threads > 0:
        set_num_threads = torch.set_num_threads
        torch.set_num_threads = lambda n: set_num_threads(min(int(n), threads))
    sys.argv[0] = "nnUNetv2_train"
    run_training_entry()


if __name__ == "__main__":
    main()
