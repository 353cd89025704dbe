"""``nnunet-ext convert NAME SOURCE_DIR --id N``: a challenge's download -> an nnU-Net raw dataset.

The definitions (layouts, labels, checks) live in :mod:`nnunet_ext.challenges`; see docs/challenges/.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunet_ext.challenges import CHALLENGES, get_challenge
from nnunet_ext.challenges.base import ConvertResult, convert, format_report, raw_root
from nnunet_ext.challenges.mots import MOTS_SOURCES
from nnunet_ext.core.errors import UserError


def convert_mots(
    source: str | os.PathLike,
    first_id: int,
    *,
    merge_id: int | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    link: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    test_list: str | None = None,
) -> tuple[dict[str, ConvertResult], Path | None]:
    """Convert the seven MOTS sources under ``source`` into ids ``first_id .. first_id + 6`` and, with
    ``merge_id``, merge them with the MOTS preset. ``test_list``: 'dodnet' (DoDNet's 235 test cases ->
    imagesTs / labelsTs; the default of ``nnunet-ext convert mots``), None / 'none' (no split) or a file.
    Returns the per-task results and the merged folder."""
    from nnunet_ext.multitask.merge import MOTS_PRESET, merge_datasets

    source = Path(source).expanduser()
    mots = get_challenge("mots")
    if not source.is_dir():
        raise UserError(f"MOTS folder {source} does not exist.\n{mots.expected_layout()}")
    folders = mots.find_source_folders(source)
    ids = {task: int(first_id) + k for k, task in enumerate(folders)}
    if max(ids.values()) > 999:
        raise UserError(f"--id {first_id}: the seven datasets need ids {first_id}..{first_id + 6} <= 999.")
    root = raw_root(out)
    if not force:
        taken = [str(p) for i in ids.values() for p in root.glob(f"Dataset{i:03d}_*") if p.is_dir()]
        if merge_id is not None:
            taken += [str(p) for p in root.glob(f"Dataset{int(merge_id):03d}_*") if p.is_dir()]
        if taken:
            raise UserError(f"dataset ids already used: {', '.join(taken)}; pass --force to replace them.")
    if merge_id is not None and merge_id in ids.values():
        raise UserError(
            f"--merge-id {merge_id} collides with the source ids {min(ids.values())}..{max(ids.values())}."
        )
    results = {}
    for task, folder in folders.items():
        results[task] = convert(
            MOTS_SOURCES[task],
            folder,
            ids[task],
            out=root,
            force=force,
            link=link,
            skip_bad=skip_bad,
            progress=progress,
            test_list=test_list,
        )
    merged = None
    if merge_id is not None:
        sources = {task: str(r.folder) for task, r in results.items()}
        merged, _ = merge_datasets(MOTS_PRESET, root, merge_id, None, sources, force=force, progress=progress)
    return results, merged


def merge_command(results: dict[str, ConvertResult], merge_id: int | str = "M") -> str:
    sources = " ".join(f"--source {task}={int(r.folder.name[7:10])}" for task, r in results.items())
    return f"nnunet-ext tasks merge --id {merge_id} --preset mots {sources}"


def _options_of(challenge, args) -> dict:
    """The challenge-specific options; an option of another challenge that was set is refused."""
    own = {flag for flag, _ in challenge.options}
    values = {}
    for other in CHALLENGES.values():
        for flag, kw in other.options:
            dest = flag.lstrip("-").replace("-", "_")
            value = getattr(args, dest, None)
            if flag in own:
                values[dest] = value
            elif value not in (None, False, kw.get("default")):
                raise UserError(
                    f"{flag} does not apply to {challenge.name}; it is an option of {other.name}."
                )
    return values


def list_challenges() -> str:
    lines = []
    for c in CHALLENGES.values():
        lines.append(f"{c.name}: {c.title}  ({c.url})")
        lines.append(c.layout)
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    if args.list:
        print(list_challenges())
        return 0
    if not args.challenge or not args.source or args.id is None:
        raise UserError(
            "usage: nnunet-ext convert NAME SOURCE_DIR --id N (nnunet-ext convert --list shows NAMEs)."
        )
    challenge = get_challenge(args.challenge)
    options = _options_of(challenge, args)
    common = dict(
        out=args.out, force=args.force, link=args.link, skip_bad=args.skip_bad, progress=not args.quiet
    )
    if challenge.name == "mots":
        if args.name:
            raise UserError("--name does not apply to `convert mots` (the datasets are named MOTS<Task>).")
        results, merged = convert_mots(
            args.source, args.id, merge_id=options.get("merge_id"), test_list=args.test_list, **common
        )
        for task, result in results.items():
            print(format_report(MOTS_SOURCES[task], result).rsplit("\n", 1)[0])
        if merged is not None:
            print(f"merged (MOTS preset) -> {merged}")
            print(
                f"next: nnUNetv2_plan_and_preprocess -d {int(merged.name[7:10])} -c 3d_fullres --verify_dataset_integrity"
            )
        else:
            print("next: " + merge_command(results))
        return 0
    if challenge.name == "mots" or not hasattr(challenge, "find_cases"):
        raise UserError(f"{challenge.name} has no converter.")
    result = convert(challenge, args.source, args.id, name=args.name, **common, **options)
    print(format_report(challenge, result))
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    text = "convert a challenge's download into an nnU-Net raw dataset"
    p = sub.add_parser(
        "convert",
        help=text,
        description=text
        + ". Challenges: "
        + ", ".join(CHALLENGES)
        + " (see docs/challenges/). The source is "
        "only read; every case is checked (missing files, label values, image/label geometry).",
    )
    p.add_argument("challenge", nargs="?", metavar="NAME", help="challenge (see --list)")
    p.add_argument("source", nargs="?", metavar="SOURCE_DIR", help="the challenge's data as downloaded")
    p.add_argument("-d", "--id", type=int, help="nnU-Net dataset id of the result (mots: the first of 7 ids)")
    p.add_argument("--name", default=None, help="dataset name (default: the challenge's, e.g. KiPA22)")
    p.add_argument("--out", default=None, help="raw data folder (default $nnUNet_raw)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset with this id")
    p.add_argument(
        "--link",
        action="store_true",
        help="hard-link .nii.gz files instead of copying them (saves space; editing a converted file in place "
        "then changes the source file too)",
    )
    p.add_argument("--skip-bad", action="store_true", help="leave out (and report) cases with problems")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the challenges and the layouts they expect")
    seen = set()
    for challenge in CHALLENGES.values():
        for flag, kw in challenge.options:
            if flag not in seen:
                seen.add(flag)
                p.add_argument(flag, **kw)
    p.set_defaults(func=_cmd)
    return p
