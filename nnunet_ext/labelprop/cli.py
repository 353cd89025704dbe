"""``nnunet-ext labelprop {interpolate,pseudo,run,qc}``: the command assembled from the modules that implement
its parts (:mod:`nnunet_ext.labelprop.propagate`, :mod:`nnunet_ext.labelprop.run`, :mod:`nnunet_ext.labelprop.qc`), so
none of them imports another to register it."""

from __future__ import annotations

import argparse

from nnunet_ext.labelprop import propagate as labelprop
from nnunet_ext.labelprop import qc as labelprop_qc
from nnunet_ext.labelprop import run as labelprop_run


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "labelprop",
        help="label propagation: train from sparse slice annotations (interpolate, pseudo, run, qc)",
        description="Label propagation for sparse slice annotations (COSMOS22 1st place): propagate annotated "
        "slices, train, pseudo-label, retrain. See docs/labelprop.md.",
    )
    sub = parser.add_subparsers(dest="labelprop_command", metavar="{interpolate,pseudo,run,qc}")
    sub.required = True
    labelprop.add_propagation_parsers(sub)
    labelprop_run.add_run_parser(sub)
    labelprop_qc.add_qc_parser(sub)
    return parser
