"""BA-Net (boundary-aware network): boundary targets, its loss and ``nnunet-ext predict-boundaries``. The network
is architectures/banet.py, the trainer trainers/nnUNetTrainerBANet.py."""
