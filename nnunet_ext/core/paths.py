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
