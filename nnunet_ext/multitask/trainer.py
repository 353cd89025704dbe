"""Trainer plumbing every multi-task trainer (DoDNet, TransDoDNet, UniSeg) shares: the task registry of the
dataset, the task of each case, and the end-of-training validation that predicts each case with its own task
(through :mod:`nnunet_ext.multitask.predict`) and stores the cross-task merge weights. The library underneath (task
layout, partial-label loss, merge rule) is :mod:`nnunet_ext.multitask.partial_labels`."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from nnunet_ext.core.train_step import unwrap
from nnunet_ext.multitask.partial_labels import (
    MERGE_WEIGHTS,
    MERGE_WEIGHTS_SET,
    merge_weights_from_summary,
    task_aware_summary,
)
from nnunet_ext.multitask.tasks import TaskRegistry, case_ids_in_folder, load_task_registry


class TaskRegistryTrainerMixin:
    """What every multi-task trainer (DoDNet, TransDoDNet, UniSeg) needs from the task registry, mixed in before
    ``nnUNetTrainer``: the subclass sets ``self.task_registry`` (a :class:`TaskRegistry` or None) in ``__init__``."""

    task_registry: TaskRegistry | None

    def unwrapped_network(self) -> nn.Module:
        """The method's network behind DDP / torch.compile."""
        return unwrap(self.network)

    def task_ids(self, keys) -> torch.Tensor:
        """Task index of every case of a batch (from its identifier through the registry)."""
        if self.task_registry is None:
            return torch.zeros(len(keys), dtype=torch.long, device=self.device)
        return torch.tensor(self.task_registry.task_ids_for_keys(keys), dtype=torch.long, device=self.device)

    def on_train_start(self):
        if self.task_registry is not None:  # every training case must belong to a task (clear error up front)
            case_ids = case_ids_in_folder(self.preprocessed_dataset_folder_base, self.dataset_json)
            load_task_registry(self.dataset_json, case_ids)
        super().on_train_start()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # remembered so that validation (--val, --val_best) stores the cross-task weights into the file it scored
        if isinstance(filename_or_checkpoint, str):
            self.nnunet_ext_checkpoint_file = filename_or_checkpoint
        super().load_checkpoint(filename_or_checkpoint)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Validation of a multi-task model (dataset with a task registry), as the official DoDNet / UniSeg code
        validates: every validation case is predicted with ITS OWN task (the case's prefix through the
        registry). One sliding-window pass per case gives every task's probabilities (averaged over mirrors and
        windows); from them

        * ``validation/CASE`` is the case's own-task map; ``summary.json`` (nnU-Net's, against the partial
          reference) and ``summary_tasks.json`` (each case on its own task's labels; nested organs on organ +
          tumour) score those maps, and the log shows the task-aware Dice;
        * the cross-task weights (own-task Dice per (task, structure), :func:`merge_weights_from_summary`) are
          stored in the network and in the checkpoint file (``merge_weights`` buffer) and in
          ``validation/merge_weights.json``;
        * ``validation_merged/CASE`` is the universal (all-task, merged) map decoded with those weights, scored in
          ``validation/summary_tasks_merged.json``.

        Without a registry (one task) this is nnU-Net's validation."""
        if self.task_registry is None:
            return super().perform_actual_validation(save_probabilities)
        import shutil

        import torch.distributed as dist
        from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder

        from nnunet_ext.core.inference import predictor_for_trainer
        from nnunet_ext.core.io import atomic_write_json
        from nnunet_ext.multitask.predict import (
            decode_scores,
            predict_task_scores,
            scores_to_original_shape,
            write_label_map,
        )

        if save_probabilities:
            self.print_to_log_file("multi-task validation writes label maps only (--npz is ignored)")
        predictor = predictor_for_trainer(self)  # deep supervision off, eval mode, as nnU-Net validates
        net = self.unwrapped_network()
        folder = os.path.join(self.output_folder, "validation")
        merged_folder = os.path.join(self.output_folder, "validation_merged")
        scores_folder = os.path.join(self.output_folder, ".validation_scores")
        for f in (folder, merged_folder, scores_folder):
            os.makedirs(f, exist_ok=True)
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank :: dist.get_world_size()]
        dataset_val = self.dataset_class(
            self.preprocessed_dataset_folder,
            val_keys,
            folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage,
        )
        ending = self.dataset_json["file_ending"]
        for k in dataset_val.identifiers:
            self.print_to_log_file(f"predicting {k} (own task {self.task_registry.task_of(k)})")
            data, _, _, properties = dataset_val.load_case(k)
            scores = predict_task_scores(predictor, torch.from_numpy(np.asarray(data[:])))
            scores = scores_to_original_shape(
                scores, properties, self.plans_manager, self.configuration_manager
            )
            task = self.task_layout.task_index(self.task_registry.task_of(k))
            seg = decode_scores(net, scores, "own", task)
            write_label_map(seg, properties, self.plans_manager, os.path.join(folder, k), ending)
            torch.save(
                {"scores": scores.half(), "properties": properties}, os.path.join(scores_folder, k + ".pt")
            )
        if self.is_ddp:
            dist.barrier()
        if self.local_rank == 0:
            gt = os.path.join(self.preprocessed_dataset_folder_base, "gt_segmentations")
            reader = self.plans_manager.image_reader_writer_class()
            metrics = compute_metrics_on_folder(
                gt,
                folder,
                os.path.join(folder, "summary.json"),
                reader,
                ending,
                self.label_manager.foreground_labels,
                self.label_manager.ignore_label,
                chill=True,
                num_processes=1,
            )
            for label in metrics["mean"]:
                self.logger.log_summary(f"final_val/class_{label}_dice", metrics["mean"][label]["Dice"])
            summary = task_aware_summary(folder, gt, self.dataset_json, reader)
            if summary is not None:
                atomic_write_json(os.path.join(folder, "summary_tasks.json"), summary)
                self.print_to_log_file(
                    "Task-aware validation Dice (each case predicted with and scored on its own task): ",
                    {k: round(v["Dice"], 4) for k, v in summary["mean"].items()},
                )
                weights, used = merge_weights_from_summary(summary, self.task_layout)
                net.set_merge_weights(weights)
                atomic_write_json(
                    os.path.join(folder, "merge_weights.json"), {"weights": weights, "by_label": used}
                )
                self.store_merge_weights_in_checkpoint(net)
                w = net.merge_weights.detach().cpu()
                for name in sorted(os.listdir(scores_folder)):
                    saved = torch.load(os.path.join(scores_folder, name), weights_only=False)
                    seg = decode_scores(net, saved["scores"].float(), "merged", weights=w)
                    write_label_map(
                        seg,
                        saved["properties"],
                        self.plans_manager,
                        os.path.join(merged_folder, name[:-3]),
                        ending,
                    )
                merged = task_aware_summary(merged_folder, gt, self.dataset_json, reader)
                if merged is not None:
                    atomic_write_json(os.path.join(folder, "summary_tasks_merged.json"), merged)
                    self.print_to_log_file(
                        "Task-aware validation Dice of the merged all-task map (validation_merged/): ",
                        {k: round(v["Dice"], 4) for k, v in merged["mean"].items()},
                    )
            shutil.rmtree(scores_folder, ignore_errors=True)
        if self.is_ddp:
            dist.barrier()

    def store_merge_weights_in_checkpoint(self, net: nn.Module) -> None:
        """Write the network's merge-weight buffers into the checkpoint this validation scored (the loaded one, or
        checkpoint_final.pth after training), atomically; other entries stay as they are."""

        path = getattr(self, "nnunet_ext_checkpoint_file", None) or os.path.join(
            self.output_folder, "checkpoint_final.pth"
        )
        if not os.path.isfile(path):
            self.print_to_log_file(f"no checkpoint at {path}: the cross-task merge weights are not stored")
            return
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        own = {k: v for k, v in net.state_dict().items() if k.endswith((MERGE_WEIGHTS, MERGE_WEIGHTS_SET))}
        ckpt["network_weights"].update({k: v.detach().cpu().clone() for k, v in own.items()})
        tmp = path + f".tmp-{os.getpid()}"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
        self.print_to_log_file(f"cross-task merge weights stored in {path}")
