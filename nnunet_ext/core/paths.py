"""nnU-Net's folders (its env vars) and dataset resolution: where raw, preprocessed and results live, and the
folder of a dataset given by id or name."""

from __future__ import annotations

import os
from pathlib import Path

from nnunet_ext.core.errors import UserError

NNUNET_FOLDERS = {
    "nnUNet_raw": "raw datasets (DatasetXXX_Name/imagesTr, labelsTr, dataset.json)",
    "nnUNet_preprocessed": "plans and preprocessed data",
    "nnUNet_results": "trained models",
}
EXT_TRAINER_VAR = "nnUNet_extTrainer"
SETUP_HINT = (
    "Set nnU-Net's folders, e.g.\n"
    "  export nnUNet_raw=$HOME/nnunet/raw nnUNet_preprocessed=$HOME/nnunet/preprocessed "
    "nnUNet_results=$HOME/nnunet/results\n"
    "  export nnUNet_extTrainer=$(nnunet-ext trainer-dir)"
)


def require_folder_var(name: str) -> Path:
    """The folder in nnU-Net's env var ``name``; a UserError naming the fix if it is unset or missing."""
    value = os.environ.get(name)
    if not value:
        raise UserError(f"{name} is not set ({NNUNET_FOLDERS.get(name, '')}).\n{SETUP_HINT}")
    path = Path(value)
    if not path.is_dir():
        raise UserError(
            f"{name}={value} does not exist or is not a folder. Create it (mkdir -p {value}) or fix {name}."
        )
    return path


def resolve_dataset(dataset: str | int, root_var: str = "nnUNet_preprocessed") -> Path:
    """Folder of a dataset given as id (``4``, ``004``) or name (``Dataset004_Phantom``) under ``root_var``."""
    root = require_folder_var(root_var)
    text = str(dataset).strip()
    if text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        matches = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
        if len(matches) > 1:
            raise UserError(
                f"dataset id {text} is ambiguous under {root_var}={root}: {', '.join(m.name for m in matches)}. "
                "Remove or rename the duplicate, or pass the full dataset name."
            )
        if matches:
            return matches[0]
    elif (root / text).is_dir():
        return root / text
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
    hint = (
        "Run `nnUNetv2_plan_and_preprocess -d ID` first."
        if root_var == "nnUNet_preprocessed"
        else "Create it first (e.g. `nnunet-ext phantoms full --id ID`)."
    )
    raise UserError(
        f"dataset {text!r} not found under {root_var}={root}. "
        f"Available: {', '.join(available) if available else 'none'}. {hint}"
    )


def resolve_dataset_folder(dataset, roots: tuple[str, ...] = ("nnUNet_raw", "nnUNet_preprocessed")) -> Path:
    """A dataset folder: a path, or a dataset id / name resolved under the first of nnU-Net's ``roots`` (env
    vars) that holds it with a dataset.json. The one resolver of our commands' dataset arguments."""
    dataset = str(dataset)
    p = Path(dataset).expanduser()
    if p.is_dir():
        return p
    if os.sep in dataset or (os.altsep and os.altsep in dataset):
        raise UserError(
            f"dataset folder {dataset} does not exist; check the path (or pass a dataset id / name)."
        )
    problems = []
    for root_var in roots:
        if not os.environ.get(root_var):
            continue
        try:
            folder = resolve_dataset(dataset, root_var)
        except UserError as e:
            problems.append(str(e))
            continue
        if (folder / "dataset.json").is_file():
            return folder
        problems.append(f"{folder} has no dataset.json")
    if not problems:
        raise UserError(
            f"cannot resolve dataset {dataset!r}: {roots[0]} is not set. Run `export {roots[0]}=/path/to/{roots[0]}` "
            f"or pass the dataset folder path instead."
        )
    raise UserError(" ".join(problems))


def dataset_name(dataset) -> str:
    """nnU-Net's full name (``Dataset004_Phantom``) of a dataset id or name, found as nnU-Net finds it (under
    nnUNet_preprocessed, nnUNet_raw, nnUNet_results); a UserError naming the fix if it is nowhere."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    text = str(dataset).strip()
    try:
        return maybe_convert_to_dataset_name(int(text) if text.isdigit() else text)
    except (RuntimeError, ValueError):
        raise UserError(
            f"dataset {dataset} not found in nnUNet_preprocessed/nnUNet_raw; run nnUNetv2_plan_and_preprocess "
            f"-d {dataset} first"
        ) from None
