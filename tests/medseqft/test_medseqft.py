"""MedSeqFT: feature taps, MDS selection (deterministic for a seed), K&G RFT trainer, and a 3-task
sequence on phantoms end to end (MedSeqFT vs sequential vs parallel fine-tuning, forgetting matrices)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from support.commands import run
from support.lora_helpers import foundation_checkpoint, make_net
from torch import nn

from nnunet_ext.cli import main as cli

torch.set_num_threads(2)

TASK_IDS = (611, 612, 613)


@pytest.mark.parametrize("style", ["plain", "resenc"])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_unet_features_reproduce_the_forward_pass(style, deep_supervision):
    from nnunet_ext.medseqft.method import FeatureTap, unet_features

    net = make_net(style).eval()
    net.decoder.deep_supervision = deep_supervision
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        ref = net(x)
        out, feats = unet_features(net, x)
        tapped = FeatureTap(net)
        plain_call = tapped(x)
    ref_list = ref if deep_supervision else [ref]
    out_list = out if deep_supervision else [out]
    for a, b in zip(ref_list, out_list):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(plain_call[0] if deep_supervision else plain_call, ref_list[0])
    assert len(feats) == 3 + 2  # every encoder stage, every decoder stage
    assert tapped.decoder is net.decoder


def test_feature_tap_rejects_networks_without_unet_decoder():
    from nnunet_ext.core.errors import UserError
    from nnunet_ext.medseqft.method import FeatureTap

    with pytest.raises(UserError, match="UNetDecoder"):
        FeatureTap(nn.Conv3d(1, 1, 1))


def test_cli_errors_name_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    code = cli(["medseqft", "select", "999", "3d_fullres", "--checkpoint", str(tmp_path / "none.pth")])
    assert code == 1 and "nnUNetv2_plan_and_preprocess" in capsys.readouterr().err
    code = cli(
        ["medseqft", "run", "--pretrained", str(tmp_path / "none.pth"), "-d", "1", "-c", "x", "-o", "o"]
    )
    assert code == 1 and "does not exist" in capsys.readouterr().err
    ckpt = tmp_path / "m0.pth"
    ckpt.write_bytes(b"")
    args = ["medseqft", "run", "--pretrained", str(ckpt), "-d", "1", "-c", "x", "-o", "o", "--lora-lr", "0"]
    assert cli(args) == 1 and "--lora-lr must be a positive" in capsys.readouterr().err
    args[-2:] = ["--kd-weight", "-1"]
    assert cli(args) == 1 and "--kd-weight must be >= 0" in capsys.readouterr().err


def test_feature_mse_normalised_by_teacher_variance_is_scale_free():
    from nnunet_ext.medseqft.method import feature_mse, logit_distillation

    torch.manual_seed(0)
    s = [torch.randn(2, 4, 4, 8, 8), torch.randn(2, 8, 2, 4, 4)]
    t = [torch.randn_like(f) for f in s]
    raw, norm = feature_mse(s, t), feature_mse(s, t, normalise=True)
    scaled = [10 * f for f in s], [10 * f for f in t]
    torch.testing.assert_close(feature_mse(*scaled), 100 * raw)
    torch.testing.assert_close(feature_mse(*scaled, normalise=True), norm)
    assert float(feature_mse(t, t, normalise=True)) == 0.0
    with pytest.raises(RuntimeError, match="architecture"):
        feature_mse(s, t[:1])
    logits = torch.randn(2, 3, 4, 8, 8)
    assert float(logit_distillation(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_distillation(logits, torch.randn_like(logits))) > 0
    assert float(logit_distillation(logits, logits, regions=True)) == 0.0


# ------------------------------------------------------------------------------------ on phantoms


def _env(monkeypatch, workspace, results: Path | None = None):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, workspace.env[k])
    if results is not None:
        monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_compile", "f")


@pytest.mark.slow
def test_mds_selection_is_deterministic_for_a_seed(phantom_workspace, monkeypatch, tmp_path):
    from nnunet_ext.core.errors import UserError
    from nnunet_ext.medseqft.method import select_buffer, write_buffer

    dataset, ckpt = foundation_checkpoint(phantom_workspace)
    _env(monkeypatch, phantom_workspace)
    kw = dict(k=2, views=2, progress=False)
    a = select_buffer(ckpt, dataset, "3d_tiny", seed=3, **kw)
    b = select_buffer(ckpt, dataset, "3d_tiny", seed=3, **kw)
    c = select_buffer(ckpt, dataset, "3d_tiny", seed=4, **kw)
    assert a["score"] == "objective"  # nnU-Net checkpoints carry their objective's head
    assert a == b
    assert a["scores"] != c["scores"]  # other random views
    # fold 0's training cases only (nnU-Net's 5-fold split of the 6 cases); -f all: every case
    assert len(a["scores"]) < 6 and len(a["buffer"]) == 2 and a["fold"] == 0
    everything = select_buffer(ckpt, dataset, "3d_tiny", seed=3, fold="all", **kw)
    assert len(everything["scores"]) == 6 and everything["fold"] == "all"
    assert a["buffer"] == sorted(a["scores"], key=a["scores"].get)[:2]
    assert all(math.isfinite(v) and v >= 0 for v in a["scores"].values())
    f1 = select_buffer(ckpt, dataset, "3d_tiny", seed=3, score="features", **kw)
    assert f1["score"] == "features" and f1 == select_buffer(
        ckpt, dataset, "3d_tiny", seed=3, score="features", **kw
    )
    # written atomically; other settings are not silently replaced
    path = tmp_path / "buffer.json"
    write_buffer(a, path, overwrite=False)
    write_buffer(a, path, overwrite=False)  # same settings: fine
    with pytest.raises(UserError, match="--overwrite"):
        write_buffer(c, path, overwrite=False)
    write_buffer(c, path, overwrite=True)
    assert json.loads(path.read_text())["seed"] == 4


@pytest.fixture
def task_sequence(phantom_workspace, monkeypatch):
    """Three binary phantom tasks (liver, kidney, spleen) planned like the other phantoms, with 3d_tiny."""
    from nnunet_ext.medseqft.method import write_task_phantoms

    root = phantom_workspace.root
    _env(monkeypatch, phantom_workspace)
    if not (root / "preprocessed" / "Dataset613_PhantomTaskSpleen").is_dir():
        write_task_phantoms(
            root / "raw", TASK_IDS[0], num_train=5, num_test=1, shape=(24, 48, 48), force=True
        )
        ids = [str(i) for i in TASK_IDS]
        run(
            ["nnUNetv2_plan_and_preprocess", "-d", *ids, "-c", "3d_fullres", "-np", "1"],
            phantom_workspace.env,
        )
        for i in ids:  # in this process: the env's nnUNet_preprocessed is the workspace's (set by the test)
            assert cli(["plans", "tiny", i]) == 0
    return [f"Dataset{i}_PhantomTask{t}" for i, t in zip(TASK_IDS, ("Liver", "Kidney", "Spleen"))]


@pytest.mark.slow
def test_kg_rft_expert_student_merge_and_resume(phantom_workspace, task_sequence, monkeypatch, tmp_path):
    """nnUNetTrainerMedSeqFT from M_{t-1}: trains the full fine-tuning expert M_t^FFT first, then the LoRA student
    that distils it (and M_{t-1} on the MDS buffer of the fold's training cases); M_t loads strictly into the
    stock network; --c resumes with the same expert (not retrained)."""
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from support.lora_helpers import make_trainer

    from nnunet_ext.medseqft.method import buffer_path, fold_training_keys, select_buffer, write_buffer

    _, ckpt = foundation_checkpoint(phantom_workspace)
    _env(monkeypatch, phantom_workspace, tmp_path)
    dataset = task_sequence[1]
    record = select_buffer(ckpt, dataset, "3d_tiny", k=2, views=1, progress=False, fold=0)
    pre = Path(phantom_workspace.env["nnUNet_preprocessed"]) / dataset
    folder = str(pre / "nnUNetPlans_3d_fullres")  # the tiny configuration's data identifier
    ids = sorted(infer_dataset_class(folder).get_identifiers(folder))
    train_keys = fold_training_keys(pre, ids, 0)
    assert set(record["scores"]) == set(train_keys)
    assert 0 < len(train_keys) < len(ids)  # the fold's validation cases are left out
    assert record["fold"] == 0 and set(record["buffer"]) <= set(train_keys)
    write_buffer(record, buffer_path(dataset), overwrite=True)

    trainer = make_trainer("nnUNetTrainerMedSeqFT_smoke", dataset)
    trainer.num_iterations_per_epoch = 2
    trainer.lora_lr = 0.05
    maybe_load_checkpoint(trainer, False, False, ckpt)  # nnUNetv2_train -pretrained_weights M_{t-1}
    trainer.run_training()
    expert_path = trainer.expert_checkpoint()
    assert "nnUNetTrainerMedSeqFTExpert_smoke__nnUNetPlans__3d_tiny" in str(expert_path)
    expert = torch.load(expert_path, weights_only=False)
    m0 = torch.load(ckpt, weights_only=False)["network_weights"]
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert not torch.equal(expert["network_weights"][key], m0[key])  # fully fine-tuned from M_{t-1}
    assert expert["current_epoch"] == 1  # the student's schedule
    log = next(Path(trainer.output_folder).glob("training_log_*.txt")).read_text()
    assert "training the full fine-tuning expert" in log
    assert "expert distillation loss" in log and "(x kd_weight 1.0)" in log
    norms = [line for line in log.splitlines() if "gradient norm on the adapters" in line]
    assert norms and all(f"{t} " in norms[0] for t in ("segmentation", "expert", "retention"))
    values = [float(v.split()[-1]) for v in norms[0].split("first batch): ", 1)[1].split(", ")]
    assert all(math.isfinite(v) for v in values)
    # segmentation and expert reach the adapters from the first batch on; retention only once the adapters have
    # moved (at the first batch lora_B = 0: the student's buffer features are the teacher's, gradient 0 or
    # rounding noise), checked after the resumed epoch below
    assert values[0] > 0 and values[1] > 0 and values[2] >= 0

    final = torch.load(Path(trainer.output_folder) / "checkpoint_final.pth", weights_only=False)
    stock = nnUNetTrainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 2, False
    )
    stock.load_state_dict(final["network_weights"], strict=True)  # M_t: stock nnU-Net weights
    assert all(k.endswith(".weight") and (".lora_A." in k or ".lora_B." in k) for k in final["lora_state"])

    # --c: adapters back from the checkpoint, the same expert from disk (not retrained), one more epoch
    stamp = expert_path.stat().st_mtime
    resumed = make_trainer("nnUNetTrainerMedSeqFT_smoke", dataset)
    resumed.num_iterations_per_epoch, resumed.num_epochs = 1, 2
    resumed.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    assert resumed.lora_injected and resumed.current_epoch == 1
    resumed.run_training()
    assert expert_path.stat().st_mtime == stamp
    assert (
        torch.load(Path(resumed.output_folder) / "checkpoint_final.pth", weights_only=False)["current_epoch"]
        == 2
    )
    log = Path(resumed.log_file).read_text()
    assert f"expert M_t^FFT from {expert_path}" in log
    norms = [line for line in log.splitlines() if "gradient norm on the adapters" in line]
    values = [float(v.split()[-1]) for v in norms[-1].split("first batch): ", 1)[1].split(", ")]
    assert len(values) == 3 and all(
        v > 0 and math.isfinite(v) for v in values
    )  # every term reaches the adapters

    # a buffer with a validation case of the fold is refused
    val_case = sorted(set(ids) - set(train_keys))[0]
    bad = make_trainer("nnUNetTrainerMedSeqFTNoExpert_smoke", dataset)
    bad.initialize()
    bad.buffer_record = {**record, "buffer": [val_case]}
    with pytest.raises(RuntimeError, match="not training cases of fold 0"):
        bad.get_buffer_dataloader()
    buffer_path(dataset).unlink()  # the shared workspace: later tests select their own buffer (other k)


OPTION_CASES = (
    # (options, M_{t-1}): "m0" = the foundation checkpoint, "expert" = case 0's expert (a body != M_0)
    (
        {
            "expert_distill": "features",
            "kd_normalise": True,
            "kd_batch_size": None,
            "expert_head_init": False,
        },
        "m0",
    ),
    ({"expert_distill": "logits", "teacher": "foundation", "distill": "logits"}, "m0"),
    ({"teacher": "both", "teacher_weights": (0.75, 0.25), "expert_weight": 0.5, "seg_weight": 0.5}, "expert"),
)


@pytest.mark.slow
def test_kg_rft_every_option_on_a_tiny_network(phantom_workspace, task_sequence, monkeypatch, tmp_path):
    """Each K&G RFT option besides the defaults trains on a tiny network (expert trained, student distils it,
    merged M_t strict in the stock network): expert distillation of features only (variance-normalised, a
    buffer batch of the training batch size, no expert head) or of logits only with the foundation teacher's
    logit retention; both retention teachers weighted when M_{t-1} != M_0. Bad option combinations are
    refused when the trainer is built."""
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from support.lora_helpers import make_trainer

    from nnunet_ext.medseqft.method import buffer_path, select_buffer, write_buffer

    _, m0 = foundation_checkpoint(phantom_workspace)
    _env(monkeypatch, phantom_workspace, tmp_path)
    dataset = task_sequence[1]
    record = select_buffer(m0, dataset, "3d_tiny", k=2, views=1, progress=False, fold=0)
    write_buffer(record, buffer_path(dataset), overwrite=True)
    try:
        previous = {"m0": m0}
        for i, (options, start) in enumerate(OPTION_CASES):
            monkeypatch.setenv("nnUNet_results", str(tmp_path / f"case{i}"))
            trainer = make_trainer("nnUNetTrainerMedSeqFT_smoke", dataset)
            for key, value in options.items():
                setattr(trainer, key, value)
            # 2 epochs: on the first batch the adapters are still zero (lora_B = 0), so the student's buffer
            # features are the retention teacher's and that term's gradient is 0 (or rounding noise)
            trainer.num_epochs, trainer.num_iterations_per_epoch = 2, 2
            trainer.lora_lr = 0.05
            maybe_load_checkpoint(trainer, False, False, previous[start])
            trainer.run_training()
            log = Path(trainer.log_file).read_text()
            assert "training the full fine-tuning expert" in log, options
            expert = torch.load(trainer.expert_checkpoint(), weights_only=False)["network_weights"]
            previous.setdefault("expert", str(trainer.expert_checkpoint()))
            norms = [line for line in log.splitlines() if "gradient norm on the adapters" in line]
            assert len(norms) == 2, options  # every epoch
            for line in norms:
                values = dict(part.split() for part in line.split("first batch): ", 1)[1].split(", "))
                assert set(values) == {"segmentation", "expert", "retention"}, options
                assert all(math.isfinite(float(v)) for v in values.values()), (options, values)
            # every term reaches the adapters once they have moved
            assert all(float(v) > 0 for v in values.values()), (options, values)
            final = torch.load(Path(trainer.output_folder) / "checkpoint_final.pth", weights_only=False)
            stock = nnUNetTrainer.build_network_architecture(
                trainer.plans_manager, trainer.configuration_manager, 1, 2, False
            )
            stock.load_state_dict(final["network_weights"], strict=True)
            head = "decoder.seg_layers.0.weight"
            if i == 0:
                # features only, normalised; buffer batch = the training batch; the student's head is its own
                assert "(features, x 1.0)" in log and "(normalised by teacher variance)" in log
                assert f"{trainer.batch_size} buffer patch(es) per step" in log
                start_head = torch.load(Path(trainer.output_folder) / "lora_start.pth")["state"][head]
                assert not torch.equal(start_head, expert[head])
            elif i == 1:
                assert "(logits, x 1.0)" in log
                assert "1 retention teacher(s) (foundation, weights [1.0]), logits distillation" in log
                assert "1 buffer patch(es) per step" in log
            else:
                # M_{t-1} (case 0's expert) differs from M_0: two teachers, weighted 0.75 / 0.25
                assert "2 retention teacher(s) (both, weights [0.75, 0.25])" in log
                assert "(both, x 0.5)" in log
                start_head = torch.load(Path(trainer.output_folder) / "lora_start.pth")["state"][head]
                assert torch.equal(start_head, expert[head])  # expert_head_init (default)
    finally:
        buffer_path(dataset).unlink(missing_ok=True)

    cls = type(make_trainer("nnUNetTrainerMedSeqFT_smoke", dataset))
    kwargs = {k: v for k, v in trainer.my_init_kwargs.items() if k != "device"}
    bad = (
        ({"distill": "logits"}, "needs the teacher's head"),  # M_{t-1}'s head is never loaded
        ({"teacher": "both", "teacher_weights": (1.0, -1.0)}, "teacher_weights"),
        ({"expert": "lora"}, "expert must be"),
        ({"expert_distill": "attention"}, "expert_distill must be"),
        ({"teacher": "m0"}, "teacher must be"),
    )
    for attributes, message in bad:
        plans = {**kwargs["plans"], "continue_training": False}  # nnU-Net 2.8 pops this key
        with pytest.raises(ValueError, match=message):
            type("nnUNetTrainerMedSeqFTBad", (cls,), attributes)(
                **{**kwargs, "plans": plans}, device=torch.device("cpu")
            )


@pytest.mark.slow
def test_three_task_sequence_end_to_end(phantom_workspace, task_sequence, monkeypatch, tmp_path):
    """M_0 -> liver -> kidney -> spleen with MedSeqFT, sequential and parallel fine-tuning (smoke schedule)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.medseqft.run import run_sequence

    _, ckpt = foundation_checkpoint(phantom_workspace)
    _env(monkeypatch, phantom_workspace)
    out = tmp_path / "run"
    result = run_sequence(
        ckpt,
        list(TASK_IDS),
        "3d_tiny",
        out,
        schedule="smoke",
        k=1,
        views=1,
        device="cpu",
        max_test_cases=1,
        iterations=1,
        lora_lr=0.05,
        kd_weight=0.5,
    )
    strategies = result["strategies"]
    assert set(strategies) == {"medseqft", "medseqft_noexpert", "sequential", "parallel"}
    for name, entry in strategies.items():
        matrix = entry["matrix"]
        assert [len(row) for row in matrix] == [1, 2, 3], name  # M_t on tasks 1..t
        assert all(math.isnan(v) or 0.0 <= v <= 1.0 for row in matrix for v in row)
        assert len(entry["models"]) == 3 and all(Path(m).is_file() for m in entry["models"])
    assert strategies["parallel"]["models"][0] == strategies["sequential"]["models"][0]
    assert "medseqft" in strategies["medseqft"]["models"][2]
    report = (out / "forgetting.md").read_text()
    assert report.count("| M_3 |") == 4
    for name in task_sequence:  # K&G RFT's expert per task, only in the medseqft strategy
        experts = out / "medseqft" / name / "nnUNetTrainerMedSeqFTExpert_smoke__nnUNetPlans__3d_tiny"
        assert (experts / "fold_0" / "checkpoint_final.pth").is_file()
        assert not (out / "medseqft_noexpert" / name / experts.name).exists()
    for name, entry in strategies.items():  # the summary table first: one row per strategy
        assert f"| {name} | {entry['final']:.3f} | {entry['bwt']:+.3f} |" in report.split("\n\n")[0]
    for name in task_sequence:  # one MDS buffer per task, in nnU-Net's preprocessed folder
        record = json.loads(
            (Path(phantom_workspace.env["nnUNet_preprocessed"]) / name / "medseqft_buffer.json").read_text()
        )
        assert len(record["buffer"]) == 1 and record["checkpoint"] == str(Path(ckpt).resolve())

    # every M_t of MedSeqFT is a stock nnU-Net checkpoint of its task (LoRA merged)
    last = torch.load(strategies["medseqft"]["models"][2], weights_only=False)
    model = Path(strategies["medseqft"]["models"][2]).parent.parent
    pm = PlansManager(json.loads((model / "plans.json").read_text()))
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_tiny"), 1, 2, False)
    net.load_state_dict(last["network_weights"], strict=True)
    assert last["trainer_name"] == "nnUNetTrainerMedSeqFT_smoke"
    log = next(Path(strategies["medseqft"]["models"][2]).parent.glob("training_log_*.txt")).read_text()
    assert "segmentation loss" in log and "distillation loss" in log  # both terms of K&G RFT in the log
    assert "(x kd_weight 0.5)" in log  # --kd-weight reached the trainer
    # --lora-lr reaches MedSeqFT's adapters only (first parameter group; the heads stay at nnU-Net's 1e-2)
    assert [g["initial_lr"] for g in last["optimizer_state"]["param_groups"]] == [0.05, 0.01]
    seq = torch.load(strategies["sequential"]["models"][2], weights_only=False)
    assert [g["initial_lr"] for g in seq["optimizer_state"]["param_groups"]] == [0.01]

    # resumable: finished trainings are not repeated
    stamp = Path(strategies["medseqft"]["models"][0]).stat().st_mtime
    again = run_sequence(
        ckpt,
        list(TASK_IDS),
        "3d_tiny",
        out,
        strategies=("medseqft",),
        schedule="smoke",
        k=1,
        views=1,
        device="cpu",
        max_test_cases=1,
        iterations=1,
        lora_lr=0.05,
        kd_weight=0.5,
    )
    assert Path(strategies["medseqft"]["models"][0]).stat().st_mtime == stamp
    assert again["strategies"]["medseqft"]["matrix"] == strategies["medseqft"]["matrix"]


def test_task_phantoms_take_the_image_profile(tmp_path):
    """`nnunet-ext medseqft phantoms --profile converge`: the convergence benchmarks' phantom, its shape by
    default; the CLI offers exactly the phantom profiles."""
    import SimpleITK as sitk

    from nnunet_ext.core.errors import UserError
    from nnunet_ext.medseqft.method import write_task_phantoms
    from nnunet_ext.tools.phantoms import PROFILE_SHAPES, PROFILES

    assert cli(["medseqft", "phantoms", "--first-id", "821", "--tasks", "kidney", "--num-train", "2",
                "--num-test", "1", "--profile", "converge", "--out", str(tmp_path)]) == 0  # fmt: skip
    folder = tmp_path / "Dataset821_PhantomTaskKidney"
    image = sitk.ReadImage(str(next((folder / "imagesTr").iterdir())))
    assert sitk.GetArrayFromImage(image).shape == PROFILE_SHAPES["converge"]
    assert "profile converge" in json.loads((folder / "dataset.json").read_text())["description"]
    with pytest.raises(UserError, match="unknown phantom profile 'ct'"):
        write_task_phantoms(tmp_path, 830, ("liver",), 2, 1, profile="ct")
    from nnunet_ext.cli import build_parser

    for name in PROFILES:  # every phantom profile, no other
        args = build_parser("medseqft").parse_args(
            ["medseqft", "phantoms", "--first-id", "821", "--profile", name]
        )
        assert args.profile == name
    with pytest.raises(SystemExit):
        build_parser("medseqft").parse_args(["medseqft", "phantoms", "--first-id", "821", "--profile", "ct"])
    assert sorted(PROFILES) == ["converge", "standard"]  # the choices the CLI lists without importing them


def test_an_interrupted_training_of_a_run_continues_from_its_last_checkpoint(tmp_path, monkeypatch):
    """`medseqft run` trains in-process: a training stopped midway goes on from checkpoint_latest.pth (nnU-Net's
    --c path), a new one starts from the pretrained weights, a finished one is not touched."""
    import nnunetv2.run.run_training as run_training

    import nnunet_ext.medseqft.run as medseqft_run

    calls = []

    class Trainer:
        def run_training(self):
            model.mkdir(parents=True, exist_ok=True)
            (model / "checkpoint_final.pth").write_bytes(b"x")

    monkeypatch.setattr(medseqft_run, "_trainer", lambda *a: Trainer())
    monkeypatch.setattr(
        run_training, "maybe_load_checkpoint", lambda t, c, v, p=None: calls.append((c, v, p))
    )
    model = (
        tmp_path / "sequential" / "Dataset612_T" / "nnUNetTrainer_converge__nnUNetPlans__3d_tiny" / "fold_0"
    )

    def train():
        return medseqft_run.train(
            tmp_path / "sequential", "nnUNetTrainer_converge", "Dataset612_T", "3d_tiny", 0, "nnUNetPlans",
            "M0.pth", "cpu",
        )  # fmt: skip

    assert train() == model / "checkpoint_final.pth" and calls == [(False, False, "M0.pth")]
    (model / "checkpoint_final.pth").unlink()
    (model / "checkpoint_latest.pth").write_bytes(b"x")  # stopped after some epochs
    calls.clear()
    train()
    assert calls == [(True, False, None)]
    calls.clear()
    train()  # finished: nothing loaded, nothing trained
    assert calls == []
