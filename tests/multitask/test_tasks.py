"""Task registry (dataset.json['nnunet_ext_tasks']): loading, queries, validation errors and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from nnunet_ext.core.errors import UserError
from nnunet_ext.multitask.tasks import (
    TASKS_KEY,
    TaskRegistryError,
    case_ids_in_folder,
    load_task_registry,
    load_task_registry_from_folder,
)

LABELS = {"background": 0, "liver": 1, "liver_tumour": 2, "kidney": 3, "kidney_tumour": 4, "spleen": 5}
TASKS = {
    "liver": {"prefixes": ["liver_"], "labels": ["liver", "liver_tumour"]},
    "kidney": {"prefixes": ["kidney_"], "labels": ["kidney", "kidney_tumour"]},
    "spleen": {"prefixes": ["spleen_", "spl_"], "labels": ["spleen"]},
}
CASES = ["liver_000", "liver_003", "kidney_001", "spleen_002", "spl_9"]


def make_dataset_json(tasks=None, labels=None) -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS if labels is None else labels),
        "numTraining": len(CASES),
        "file_ending": ".nii.gz",
        TASKS_KEY: copy.deepcopy(TASKS if tasks is None else tasks),
    }


def write_dataset(folder, dataset_json, cases=CASES, sub="labelsTr"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    (folder / sub).mkdir(exist_ok=True)
    for c in cases:  # only the file names matter to the registry
        (folder / sub / f"{c}.nii.gz").write_bytes(b"")
    return folder


def run_cli(argv: list[str]) -> int:
    """``nnunet-ext ARGV`` through cli.main (its error handling included)."""
    from nnunet_ext import cli

    return cli.main(argv)


# ------------------------------------------------------------------------------------------- loading


def test_valid_registry_and_queries():
    reg = load_task_registry(make_dataset_json(), CASES)
    assert reg.tasks == ("liver", "kidney", "spleen")
    assert len(reg) == reg.num_tasks == 3
    assert [reg.task_index(t) for t in reg.tasks] == [0, 1, 2]
    assert reg.task_of("liver_003") == "liver"
    assert reg.task_of("spl_9") == "spleen"
    assert reg.labels_of("liver") == [1, 2]
    assert reg.labels_of("kidney") == [3, 4]
    assert reg.labels_of("spleen") == [5]
    assert reg.label_names_of("kidney") == ["kidney", "kidney_tumour"]
    assert reg.prefixes_of("spleen") == ["spleen_", "spl_"]
    keys = np.array(["kidney_001", "liver_000", "spleen_002", "kidney_7"])  # a batch's 'keys'
    assert reg.task_ids_for_keys(keys) == [1, 0, 2, 1]
    assert reg.cases_by_task(CASES) == {
        "liver": ["liver_000", "liver_003"],
        "kidney": ["kidney_001"],
        "spleen": ["spleen_002", "spl_9"],
    }


def test_to_json_round_trip_and_int_labels():
    tasks = copy.deepcopy(TASKS)
    tasks["liver"]["labels"] = [1, "liver_tumour"]  # ints are mapped to names
    reg = load_task_registry(make_dataset_json(tasks))
    assert reg.label_names_of("liver") == ["liver", "liver_tumour"]
    assert reg.to_json()["liver"] == {"prefixes": ["liver_"], "labels": ["liver", "liver_tumour"]}
    again = load_task_registry(make_dataset_json(reg.to_json()))
    assert again == reg
    json.dumps(reg.to_json())


def test_order_defines_task_index():
    tasks = {k: TASKS[k] for k in ("spleen", "liver", "kidney")}
    reg = load_task_registry(make_dataset_json(tasks))
    assert reg.tasks == ("spleen", "liver", "kidney")
    assert reg.task_index("kidney") == 2


def test_task_of_unknown_case_names_case_and_prefixes():
    reg = load_task_registry(make_dataset_json())
    with pytest.raises(TaskRegistryError) as e:
        reg.task_of("pancreas_001")
    msg = str(e.value)
    assert "pancreas_001" in msg and "liver_" in msg and "kidney_" in msg
    assert isinstance(e.value, UserError)
    with pytest.raises(TaskRegistryError, match="unknown task 'lung'"):
        reg.labels_of("lung")


def _mutate(fn):
    dj = make_dataset_json()
    fn(dj)
    return dj


ERROR_CASES = {
    "missing key": (
        lambda dj: dj.pop(TASKS_KEY),
        ["no 'nnunet_ext_tasks'", "docs/task-registry.md", "prefixes"],
    ),
    "not a dict": (lambda dj: dj.__setitem__(TASKS_KEY, ["liver"]), ["must be an object", "list"]),
    "empty": (lambda dj: dj.__setitem__(TASKS_KEY, {}), ["empty"]),
    "no prefixes": (lambda dj: dj[TASKS_KEY]["kidney"].pop("prefixes"), ["'kidney' has no prefixes"]),
    "empty prefixes": (lambda dj: dj[TASKS_KEY]["kidney"].__setitem__("prefixes", []), ["has no prefixes"]),
    "prefix not a list": (lambda dj: dj[TASKS_KEY]["kidney"].__setitem__("prefixes", "kidney_"), ["list"]),
    "no labels": (lambda dj: dj[TASKS_KEY]["spleen"].pop("labels"), ["'spleen' has no labels"]),
    "unknown label": (
        lambda dj: dj[TASKS_KEY]["liver"].__setitem__("labels", ["liver", "pancreas"]),
        ["'pancreas'", "not in dataset.json 'labels'", "Valid labels", "kidney_tumour"],
    ),
    "unknown label value": (
        lambda dj: dj[TASKS_KEY]["liver"].__setitem__("labels", [9]),
        ["value 9", "Valid"],
    ),
    "background listed": (
        lambda dj: dj[TASKS_KEY]["liver"].__setitem__("labels", ["background", "liver"]),
        ["'background'", "never listed"],
    ),
    "background value": (
        lambda dj: dj[TASKS_KEY]["liver"].__setitem__("labels", [0, 1]),
        ["value 0", "background"],
    ),
    "ignore listed": (
        lambda dj: (
            dj["labels"].__setitem__("ignore", 6),
            dj[TASKS_KEY]["liver"].__setitem__("labels", ["ignore"]),
        ),
        ["'ignore'", "never listed"],
    ),
    "duplicate label": (lambda dj: dj[TASKS_KEY]["liver"].__setitem__("labels", ["liver", 1]), ["twice"]),
    "ambiguous prefix": (
        lambda dj: dj[TASKS_KEY]["kidney"].__setitem__("prefixes", ["liver_k"]),
        ["ambiguous", "'liver_'", "'liver_k'", "both tasks"],
    ),
    "same prefix": (lambda dj: dj[TASKS_KEY]["spleen"].__setitem__("prefixes", ["kidney_"]), ["ambiguous"]),
    "region label": (
        lambda dj: (
            dj["labels"].__setitem__("organ", [1, 2]),
            dj[TASKS_KEY]["liver"].__setitem__("labels", ["organ"]),
        ),
        ["region"],
    ),
    "task not an object": (lambda dj: dj[TASKS_KEY].__setitem__("liver", ["liver_"]), ["must be an object"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_invalid_registry_errors(case):
    mutate, expected = ERROR_CASES[case]
    with pytest.raises(TaskRegistryError) as e:
        load_task_registry(_mutate(mutate))
    for text in expected:
        assert text in str(e.value), (case, str(e.value))


def test_case_in_no_task():
    with pytest.raises(TaskRegistryError) as e:
        load_task_registry(make_dataset_json(), CASES + ["pancreas_004"])
    assert "pancreas_004" in str(e.value) and "belong to no task" in str(e.value)


def test_task_without_cases():
    with pytest.raises(TaskRegistryError) as e:
        load_task_registry(make_dataset_json(), ["liver_000", "kidney_001"])
    assert "'spleen'" in str(e.value) and "no training case" in str(e.value)


def test_load_from_raw_and_preprocessed_folder(tmp_path):
    raw = write_dataset(tmp_path / "Dataset001_X", make_dataset_json())
    assert case_ids_in_folder(raw) == sorted(CASES)
    assert load_task_registry_from_folder(raw).tasks == ("liver", "kidney", "spleen")
    pre = write_dataset(tmp_path / "pre", make_dataset_json(), sub="gt_segmentations")
    assert load_task_registry_from_folder(pre).labels_of("spleen") == [5]
    # the folder's cases are checked
    bad = write_dataset(tmp_path / "bad", make_dataset_json(), cases=["liver_0", "kidney_0"])
    with pytest.raises(TaskRegistryError, match="'spleen'"):
        load_task_registry_from_folder(bad)
    with pytest.raises(TaskRegistryError, match="no dataset.json"):
        load_task_registry_from_folder(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def raw_root(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    write_dataset(root / "Dataset042_Tasks", make_dataset_json())
    bad_dj = make_dataset_json()
    bad_dj[TASKS_KEY]["liver"]["labels"] = ["pancreas"]
    write_dataset(root / "Dataset043_Bad", bad_dj)
    monkeypatch.setenv("nnUNet_raw", str(root))
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    return root


def test_cli_show_and_validate(raw_root, capsys):
    assert run_cli(["tasks", "show", str(raw_root / "Dataset042_Tasks")]) == 0
    out = capsys.readouterr().out
    assert "liver_tumour (2)" in out and "spleen_, spl_" in out
    lines = {line.split()[1]: line.split() for line in out.splitlines()[2:]}
    assert lines["liver"][-1] == "2" and lines["kidney"][-1] == "1" and lines["spleen"][-1] == "2"
    assert run_cli(["tasks", "validate", "42"]) == 0
    assert "task registry OK" in capsys.readouterr().out
    assert run_cli(["tasks", "show", "Dataset042_Tasks"]) == 0


def test_cli_validate_errors(raw_root, capsys, monkeypatch):
    assert run_cli(["tasks", "validate", "43"]) == 1
    assert "'pancreas'" in capsys.readouterr().err
    assert run_cli(["tasks", "show", "43"]) == 1
    assert run_cli(["tasks", "validate", "77"]) == 1  # no such id
    assert "dataset '77' not found" in capsys.readouterr().err
    assert run_cli(["tasks", "validate", str(raw_root / "missing") + "/"]) == 1
    monkeypatch.delenv("nnUNet_raw")
    assert run_cli(["tasks", "validate", "42"]) == 1
    assert "export nnUNet_raw=" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a sub-command is required
        run_cli(["tasks"])


# ---------------------------------------------------------------------------------------- nested structures
def test_nested_flag_is_read_validated_and_written_back():
    tasks = copy.deepcopy(TASKS)
    tasks["liver"]["nested"] = True
    reg = load_task_registry(make_dataset_json(tasks), CASES)
    assert reg.nested_of("liver") and not reg.nested_of("kidney")
    assert reg.to_json()["liver"]["nested"] is True and "nested" not in reg.to_json()["kidney"]
    from nnunet_ext.multitask.partial_labels import TaskLayout

    layout, _ = TaskLayout.from_dataset_json(make_dataset_json(tasks))
    assert layout.nested == (True, False, False)


@pytest.mark.parametrize(
    "task, value, match",
    [
        ("spleen", True, "only.*spleen.*inner label"),  # a task without an inner label
        ("liver", "yes", "must be true or false"),
    ],
)
def test_nested_flag_errors_name_the_fix(task, value, match):
    tasks = copy.deepcopy(TASKS)
    tasks[task]["nested"] = value
    with pytest.raises(TaskRegistryError, match=match):
        load_task_registry(make_dataset_json(tasks))
