"""``nnunet-ext predict-boundaries``: BA-Net's boundary probability maps as images, for quality checks.

Uses nnU-Net's own predictor end to end (preprocessing, sliding window with Gaussian weighting and
mirroring, fold ensembling, resampling back to the input geometry); only the network output is swapped for
the boundary decoder's full-resolution output. Writes ``<case>_boundary.nii.gz`` (float32, probability that
a voxel is on a boundary) with the input image's spacing, origin and direction.
"""

from __future__ import annotations

from pathlib import Path

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.nnunet_commands import device_arg, fold_arg


class BoundaryView:
    """Callable the predictor uses as ``network``: the boundary logits of a BA-Net (any mode)."""

    def __init__(self, network):
        self.network = network

    def __call__(self, x):
        return self.network.forward_both(x)[1]

    def eval(self):  # the predictor may switch modes
        self.network.eval()
        return self

    def to(self, *args, **kwargs):
        self.network.to(*args, **kwargs)
        return self


def predict_boundaries(
    model_folder: Path,
    input_folder: Path,
    output_folder: Path,
    folds=(0,),
    checkpoint: str = "checkpoint_final.pth",
    device: str = "auto",
    force: bool = False,
    mirroring: bool = True,
) -> list[Path]:
    import numpy as np
    import torch
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunet_ext.core.inference import predictor_from_model_folder
    from nnunet_ext.core.io import atomic_write_image
    from nnunet_ext.core.progress import progress as progress_bar

    if not Path(input_folder).is_dir():
        raise UserError(f"input folder {input_folder} does not exist")
    for fold in folds:
        if not (Path(model_folder) / f"fold_{fold}" / checkpoint).is_file():
            raise UserError(
                f"{model_folder}/fold_{fold}/{checkpoint} not found: train that fold first or pick "
                "folds with -f / a checkpoint with -chk"
            )
    predictor = predictor_from_model_folder(model_folder, folds, checkpoint, device, tta=mirroring)
    network = predictor.network
    if not hasattr(network, "forward_both"):
        raise UserError(
            f"the model in {model_folder} ({type(network).__name__}) has no boundary decoder: "
            "predict-boundaries needs a BA-Net model (trained with nnUNetTrainerBANet)"
        )
    file_ending = predictor.dataset_json["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(str(input_folder), file_ending)
    if not cases:
        raise UserError(f"no images named CASE_0000{file_ending} in {input_folder}")
    n_channels = len(predictor.dataset_json["channel_names"])
    bad = [c[0] for c in cases if len(c) != n_channels]
    if bad:
        raise UserError(f"{len(bad)} case(s) do not have the model's {n_channels} channel(s), e.g. {bad[0]}")
    names = [Path(c[0]).name[: -len(file_ending) - 5] for c in cases]
    outputs = [Path(output_folder) / f"{name}_boundary.nii.gz" for name in names]
    existing = [o for o in outputs if o.exists()]
    if existing and not force:
        raise UserError(
            f"{len(existing)} output file(s) exist, e.g. {existing[0]}; pass --force to overwrite"
        )
    Path(output_folder).mkdir(parents=True, exist_ok=True)

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    preprocessor = cm.preprocessor_class(verbose=False)
    boundary_labels = LabelManager({"background": 0, "boundary": 1}, regions_class_order=None)
    view = BoundaryView(network)
    for files, out in progress_bar(list(zip(cases, outputs)), "boundary maps"):
        data, _, props = preprocessor.run_case(files, None, pm, cm, predictor.dataset_json)
        if "sitk_stuff" not in props:
            raise UserError(
                "predict-boundaries writes NIfTI via SimpleITK; this dataset's reader is not SimpleITKIO"
            )
        data = torch.from_numpy(data).float()
        logits = None
        for params in predictor.list_of_parameters:
            network.load_state_dict(params)
            # the predictor sizes its output from label_manager: both are swapped for the 2-class boundary output
            segmentation_labels = predictor.label_manager
            predictor.network, predictor.label_manager = view, boundary_labels
            try:
                fold_logits = predictor.predict_sliding_window_return_logits(data).float().cpu()
            finally:
                predictor.network, predictor.label_manager = network, segmentation_labels
            logits = fold_logits if logits is None else logits + fold_logits
        logits /= len(predictor.list_of_parameters)
        _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, pm, cm, boundary_labels, props, return_probabilities=True
        )
        sitk_stuff = props["sitk_stuff"]
        atomic_write_image(
            out,
            np.asarray(probabilities[1], dtype=np.float32),
            tuple(sitk_stuff["spacing"])[::-1],
            origin=sitk_stuff["origin"],
            direction=sitk_stuff["direction"],
        )
    return outputs


def _cmd(args):
    from nnunet_ext.core.paths import require_folder_var, resolve_dataset

    if args.model_folder:
        model = Path(args.model_folder)
    else:
        if not (args.dataset and args.configuration):
            raise UserError("give -d DATASET and -c CONFIGURATION (with -tr/-p), or -m MODEL_FOLDER")
        require_folder_var("nnUNet_results")
        dataset = resolve_dataset(args.dataset, "nnUNet_results")
        model = dataset / f"{args.trainer}__{args.plans}__{args.configuration}"
    if not model.is_dir():
        raise UserError(f"model folder {model} does not exist: check -d/-c/-tr/-p, or train the model first")
    folds = [f if f == "all" else int(f) for f in args.folds]
    outputs = predict_boundaries(
        model,
        Path(args.input),
        Path(args.output),
        folds,
        args.checkpoint,
        args.device,
        args.force,
        not args.disable_tta,
    )
    print(f"wrote {len(outputs)} boundary map(s) to {args.output}")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict-boundaries",
        help="write a BA-Net model's boundary probability maps as images (quality checks)",
        description="Predict BA-Net boundary probability maps for the images in -i (nnU-Net naming, "
        "CASE_0000.nii.gz) and write <case>_boundary.nii.gz to -o, in the input geometry. Same arguments as "
        "nnUNetv2_predict.",
    )
    p.add_argument("-i", "--input", required=True, help="folder of images (CASE_XXXX.nii.gz)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-d", "--dataset", help="dataset id or name (under nnUNet_results)")
    p.add_argument("-c", "--configuration", help="configuration, e.g. 3d_fullres")
    p.add_argument(
        "-tr", "--trainer", default="nnUNetTrainerBANet", help="trainer (default nnUNetTrainerBANet)"
    )
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-m", "--model-folder", help="model folder instead of -d/-c/-tr/-p")
    p.add_argument(
        "-f", "--folds", nargs="+", type=fold_arg, default=["0"], help="folds to ensemble (default 0)"
    )
    p.add_argument(
        "-chk",
        "--checkpoint",
        default="checkpoint_final.pth",
        help="checkpoint file name (default checkpoint_final.pth)",
    )
    p.add_argument(
        "-device", "--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)"
    )
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=_cmd)
