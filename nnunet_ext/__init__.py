"""nnunet_ext: published 3D segmentation methods as nnU-Net v2 plugins."""

from pathlib import Path

__version__ = "0.1.0"


def trainer_dir() -> str:
    """Folder to put in ``nnUNet_extTrainer`` so that the stock nnU-Net commands find our trainers."""
    return str(Path(__file__).resolve().parent / "trainer_dir")
