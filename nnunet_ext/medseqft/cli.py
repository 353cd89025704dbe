"""``nnunet-ext medseqft {select,phantoms,run}``. The parsers import nothing heavy: each handler imports
:mod:`nnunet_ext.medseqft.method` or :mod:`nnunet_ext.medseqft.run` (and so torch) only when it runs."""

from __future__ import annotations

import argparse

from nnunet_ext.core.nnunet_commands import device_arg
from nnunet_ext.medseqft.settings import BUFFER_FILE, PHANTOM_TASKS, SCORES, STRATEGIES, SUFFIX


def _select(args: argparse.Namespace) -> int:
    from nnunet_ext.medseqft.method import _cmd_select

    return _cmd_select(args)


def _phantoms(args: argparse.Namespace) -> int:
    from nnunet_ext.medseqft.method import _cmd_phantoms

    return _cmd_phantoms(args)


def _run(args: argparse.Namespace) -> int:
    from nnunet_ext.medseqft.run import _cmd_run

    return _cmd_run(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "medseqft",
        help="MedSeqFT: MDS buffer selection and sequential fine-tuning runs (docs/medseqft.md)",
        description="MedSeqFT sequential fine-tuning (arXiv 2509.06096); see docs/medseqft.md.",
    )
    sub = parser.add_subparsers(dest="medseqft_command", metavar="{select,run,phantoms}")
    sub.required = True
    sel = sub.add_parser(
        "select",
        help="MDS: score the training cases of a task under the foundation model, keep the top K as buffer",
        description="MDS selection: score every training case of DATASET by its similarity to the "
        "foundation model's pre-training distribution and write the K most similar as the MedSeqFT buffer "
        f"(default: nnUNet_preprocessed/DatasetX/{BUFFER_FILE}, where nnUNetTrainerMedSeqFT reads it).",
    )
    sel.add_argument("dataset", help="dataset id or name (preprocessed)")
    sel.add_argument("configuration", help="configuration, e.g. 3d_fullres")
    sel.add_argument(
        "-chk", "--checkpoint", required=True, help="foundation model M_0 (nnU-Net checkpoint .pth)"
    )
    sel.add_argument("-k", type=int, default=None, help="buffer size (default: --fraction of the cases)")
    sel.add_argument("--fraction", type=float, default=0.2, help="buffer size as a fraction (default 0.2)")
    sel.add_argument("--views", type=int, default=8, help="random views per case (default 8)")
    sel.add_argument("--seed", type=int, default=0, help="seed of the random views (default 0)")
    sel.add_argument(
        "-f",
        "--fold",
        default="0",
        help="nnU-Net fold the buffer is for: only its training cases are scored (default 0; 'all': every case)",
    )
    sel.add_argument("--score", choices=SCORES, default="auto", help="default auto: objective if available")
    sel.add_argument("--reference", default=None, help="features score: pre-training dataset as reference")
    sel.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    sel.add_argument(
        "-device",
        "--device",
        type=device_arg,
        default="auto",
        help="cpu, cuda, cuda:N, mps or auto (default: CUDA if available)",
    )
    sel.add_argument("-o", "--output", default=None, help="write here instead of the preprocessed folder")
    sel.add_argument("--overwrite", action="store_true", help="replace a buffer selected with other settings")
    sel.set_defaults(func=_select)
    ph = sub.add_parser(
        "phantoms",
        help="a task sequence on phantoms: one binary dataset per structure (same plans)",
        description="Write one binary phantom dataset per task (ids FIRST_ID, FIRST_ID+1, ...) into "
        "nnUNet_raw (or --out): a task sequence for `nnunet-ext medseqft run`.",
    )
    ph.add_argument(
        "--first-id", type=int, required=True, help="dataset id of the first task (then +1, +2, ...)"
    )
    ph.add_argument(
        "--tasks",
        nargs="+",
        default=["liver", "kidney", "spleen"],
        choices=PHANTOM_TASKS,
        help="the structures, one binary task each, in sequence order (default liver kidney spleen)",
    )
    ph.add_argument("--num-train", type=int, default=12, help="training cases per task (default 12)")
    ph.add_argument("--num-test", type=int, default=4, help="test cases per task (default 4)")
    ph.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="volume shape (default 32 64 64; with --profile converge 24 48 48)",
    )
    ph.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    ph.add_argument(
        "--profile",
        choices=["standard", "converge"],
        default="standard",
        help="image profile of `nnunet-ext phantoms` (default standard; converge: the convergence benchmarks)",
    )
    ph.add_argument("--out", default=None, help="raw folder (default: $nnUNet_raw)")
    ph.add_argument("--force", action="store_true", help="replace datasets with these ids")
    ph.set_defaults(func=_phantoms)
    _add_run_parser(sub)
    return parser


def _add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="the whole task sequence: MedSeqFT vs sequential vs parallel fine-tuning, forgetting matrices",
        description="Fine-tune M_0 on D_1..D_n in order with MedSeqFT, plain sequential fine-tuning and "
        "parallel fine-tuning; evaluate every M_t on the test sets of all tasks seen so far.",
    )
    p.add_argument("--pretrained", required=True, help="foundation model M_0 (nnU-Net checkpoint .pth)")
    p.add_argument("-d", "--datasets", nargs="+", required=True, help="task datasets D_1..D_n, in order")
    p.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-o", "--output", required=True, help="run folder (models, forgetting matrices)")
    p.add_argument(
        "--strategies",
        nargs="+",
        default=list(STRATEGIES),
        choices=STRATEGIES,
        help="strategies to run (default all)",
    )
    p.add_argument("--schedule", choices=list(SUFFIX), default="full", help="training length (default full)")
    p.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs (all strategies)")
    p.add_argument("--iterations", type=int, default=None, help="override iterations per epoch")
    p.add_argument(
        "--lora-lr",
        type=float,
        default=None,
        help="learning rate of MedSeqFT's LoRA adapters (default: the trainer's lora_lr)",
    )
    p.add_argument(
        "--kd-weight",
        type=float,
        default=None,
        help="weight of MedSeqFT's distillation term (default: the trainer's kd_weight)",
    )
    p.add_argument("-f", "--fold", type=int, default=0, help="nnU-Net fold of every training (default 0)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-k", type=int, default=None, help="MDS buffer size (default --fraction of the cases)")
    p.add_argument("--fraction", type=float, default=0.2, help="MDS buffer size as a fraction (default 0.2)")
    p.add_argument("--views", type=int, default=8, help="MDS random views per case (default 8)")
    p.add_argument("--seed", type=int, default=0, help="MDS seed (default 0)")
    p.add_argument(
        "--score", choices=SCORES, default="auto", help="MDS score (default auto: objective if available)"
    )
    p.add_argument("--max-test-cases", type=int, default=None, help="evaluate at most N test cases per task")
    p.add_argument(
        "-device",
        "--device",
        type=device_arg,
        default="auto",
        help="cpu, cuda, cuda:N, mps or auto (default: CUDA if available)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace buffers / a run with other settings")
    p.set_defaults(func=_run)
