"""The ``nnunet-ext`` command. Each sub-command lives in the module that implements it; that module
exposes ``add_parser(subparsers)`` which registers its parser(s) and sets ``func`` to the handler."""

from __future__ import annotations

import argparse
import errno
import sys

from nnunet_ext import __version__
from nnunet_ext.errors import UserError

# module name -> imported lazily so that `nnunet-ext trainer-dir` stays fast (no torch import)
COMMAND_MODULES = [
    "environment",
    "plans",
    "phantoms",
    "tasks",
    "demo",
    "bench",
    "predict_boundaries",
    "labelprop",
    "fingerprint",
    "universal",
    "convert",
    "evaluate",
    "submit",
    "uniseg",
    "medseqft",
]


# a write that fails for these reasons is the machine's problem, not a bug: one line, exit 1, no traceback
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}


class Parser(argparse.ArgumentParser):
    """argparse with our error convention: a bad argument is one line naming it and where the help is, exit 1."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
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
    for name in COMMAND_MODULES:
        importlib.import_module(f"nnunet_ext.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trainer-dir"]:  # fast path, used in `export nnUNet_extTrainer=$(...)`
        from nnunet_ext import trainer_dir

        print(trainer_dir())
        return 0
    parser = build_parser()
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
