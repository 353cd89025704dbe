"""``nnunet-ext tasks {show,validate,merge}``: the command assembled from :mod:`nnunet_ext.multitask.tasks` (the
registry) and :mod:`nnunet_ext.multitask.merge` (merging datasets), so neither imports the other to register it."""

from __future__ import annotations

import argparse

from nnunet_ext.multitask import merge, tasks


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tasks",
        help="show or validate a dataset's task registry (dataset.json['nnunet_ext_tasks'])",
        description="Inspect the task registry of a dataset (see docs/task-registry.md).",
    )
    sub = parser.add_subparsers(dest="tasks_command", metavar="{show,validate,merge}")
    sub.required = True
    tasks.add_registry_parsers(sub)
    merge.add_merge_parser(sub)
    return parser
