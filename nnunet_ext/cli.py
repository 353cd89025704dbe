"""The ``nnunet-ext`` command. Each sub-command lives in the module that implements it; that module
exposes ``add_parser(subparsers)`` which registers its parser(s) and sets ``func`` to the handler."""

from __future__ import annotations

import argparse
import errno
import sys

from nnunet_ext import __version__
from nnunet_ext.core.errors import UserError

# Every top-level sub-command, the module whose ``add_parser`` registers it, and its one-line help. Only the
# module of the command being run is imported, and `nnunet-ext --help` imports none, so neither imports torch
# (tests/test_cli_help.py checks both, and that this table matches what the modules register).
COMMANDS = {
    "trainer-dir": ("tools.doctor", "print the folder to put in nnUNet_extTrainer"),
    "doctor": (
        "tools.doctor",
        "check nnU-Net's env vars, nnUNet_extTrainer and that nnU-Net finds our trainers",
    ),
    "plans": (
        "planning.plans",
        "edit nnU-Net plans: derive configurations, swap architectures, tiny preset, check",
    ),
    "phantoms": ("tools.phantoms", "write a synthetic abdomen-like CT phantom dataset (nnU-Net raw format)"),
    "tasks": (
        "multitask.cli",
        "show or validate a dataset's task registry (dataset.json['nnunet_ext_tasks'])",
    ),
    "demo": (
        "tools.demo",
        "run the whole path on a phantom: preprocess, train baseline + ours, predict, evaluate, figure",
    ),
    "bench": (
        "tools.bench",
        "train-step time, peak memory and inference time of a trainer vs plain nnUNetTrainer",
    ),
    "predict-boundaries": (
        "banet.predict_boundaries",
        "write a BA-Net model's boundary probability maps as images (quality checks)",
    ),
    "labelprop": (
        "labelprop.cli",
        "label propagation: train from sparse slice annotations (interpolate, pseudo, run, qc)",
    ),
    "fingerprint": (
        "planning.fingerprint",
        "nnU-Net's dataset fingerprint without the ignore label in the foreground intensity statistics",
    ),
    "predict": (
        "multitask.predict",
        "DoDNet/TransDoDNet/UniSeg prediction: all tasks, one task (--task) or each case's task (--by-prefix)",
    ),
    "postprocess": (
        "multitask.predict",
        "DoDNet-style post-processing of label maps: largest components, tumour inside organ, small blobs",
    ),
    "convert": ("challenges.convert", "convert a challenge's download into an nnU-Net raw dataset"),
    "evaluate": (
        "challenges.evaluate",
        "a challenge's official metrics (Dice, HD95, HD, average distance, NSD, ...) per case and class",
    ),
    "submit": (
        "challenges.submit",
        "write predictions as a challenge's evaluation expects them (names, format, label values)",
    ),
    "uniseg": (
        "uniseg.commands",
        "UniSeg: merge tasks with different image channels; convert a checkpoint for fine-tuning",
    ),
    "medseqft": (
        "medseqft.cli",
        "MedSeqFT: MDS buffer selection and sequential fine-tuning runs (docs/medseqft.md)",
    ),
}
COMMAND_MODULES = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


# a write that fails for these reasons is the machine's problem, not a bug: one line, exit 1, no traceback
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}


class Parser(argparse.ArgumentParser):
    """argparse with our error convention: a bad argument is one line naming it and where the help is, exit 1."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``nnunet-ext`` parser. With ``command`` (a name in :data:`COMMANDS`) only that command's module is
    imported and registers its full parser; the other commands (and all of them without ``command``) are
    listed by name and help only, which is all ``nnunet-ext --help`` and a wrong command name need."""
    import importlib

    parser = Parser(
        prog="nnunet-ext",
        description="nnunet_ext: published 3D segmentation methods as nnU-Net v2 plugins. "
        "Train and predict with the stock nnUNetv2_* commands after "
        "`export nnUNet_extTrainer=$(nnunet-ext trainer-dir)`.",
    )
    parser.add_argument("--version", action="version", version=f"nnunet-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    if command is not None:
        importlib.import_module(f"nnunet_ext.{COMMANDS[command][0]}").add_parser(sub)
    for name, (_, text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=text)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names (its first argument that is not an option), or None."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["trainer-dir"]:  # fast path, used in `export nnUNet_extTrainer=$(...)`
        from nnunet_ext import trainer_dir

        print(trainer_dir())
        return 0
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"nnunet-ext {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(
            f"nnunet-ext {args.command}: error: {e.strerror}{where}; make the folder writable, free space on its disk "
            f"or choose another output location, then rerun (our outputs are written atomically: nothing "
            f"half-written is left under its final name).",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("nnunet-ext: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
