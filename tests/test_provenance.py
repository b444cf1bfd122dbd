"""Evaluation fidelity: which split folder was read, where every evaluated dataset came from, and
normalised accuracy from the fine-tuned checkpoints being evaluated."""
import json
import shutil

import pytest
from torchvision.transforms import ToTensor

import utils
from src.args import split_folders
from src.datasets import folder_sets
from src.datasets.folder_sets import set_split_folders
from src.datasets.registry import get_dataset, resolve_tasks
from src.eval import FinetunedCache
from tests.conftest import cli
from tests.test_datasets import write_image_folder

CLASSES = ["banded", "blotchy", "polka-dotted"]
EUROSAT = ["AnnualCrop", "Forest", "SeaLake"]
# task, dataset name evaluated, split folder parent, its two names (task_vectors first), train folder
LAYOUTS = [("DTD", "DTD", "dtd", ("val", "test"), CLASSES),
           ("SUN397", "SUN397", "sun397", ("val", "test"), ["a_abbey", "b_bar"]),
           ("EuroSAT", "EuroSATVal", "EuroSAT_splits", ("val", "valid"), EUROSAT)]


@pytest.fixture(autouse=True)
def no_split_choice():
    """Split-folder choices are process-wide (main.py sets them per run): start and end with none."""
    set_split_folders({})
    folder_sets._same_files.cache_clear()
    yield
    set_split_folders({})


def two_split_folders(root, parent, names, classes, same: bool):
    write_image_folder(root / parent / "train", classes, per_class=4)
    write_image_folder(root / parent / names[0], classes, per_class=2)
    write_image_folder(root / parent / names[1], classes, per_class=2 if same else 1)
    if parent == "EuroSAT_splits":
        write_image_folder(root / parent / "test", classes, per_class=1)


@pytest.mark.parametrize("task,name,parent,names,classes", LAYOUTS)
def test_two_different_split_folders_are_refused(tmp_path, task, name, parent, names, classes):
    two_split_folders(tmp_path, parent, names, classes, same=False)
    with pytest.raises(ValueError) as err:
        get_dataset(name, None, str(tmp_path), num_workers=0)
    message = str(err.value)
    for folder in names:  # names both folders and the flag that picks each
        assert str(tmp_path / parent / folder) in message and f"--split-folder {task}={folder}" in message


@pytest.mark.parametrize("task,name,parent,names,classes", LAYOUTS)
def test_the_chosen_split_folder_is_read_and_recorded(tmp_path, task, name, parent, names, classes):
    two_split_folders(tmp_path, parent, names, classes, same=False)
    for folder, n in zip(names, (2, 1)):
        set_split_folders({task.lower(): folder})  # task names are case-insensitive
        split = get_dataset(name, ToTensor(), str(tmp_path), num_workers=0)
        assert len(split.dataset) == n * len(classes)
        assert split.provenance == {"source": str(tmp_path / parent / folder), "split": split.split,
                                    "n": n * len(classes)}
        assert split.split == ("val" if name.endswith("Val") else "test")


@pytest.mark.parametrize("task,name,parent,names,classes", LAYOUTS)
def test_identical_split_folders_are_used_and_said(tmp_path, capsys, task, name, parent, names, classes):
    two_split_folders(tmp_path, parent, names, classes, same=True)
    split = get_dataset(name, None, str(tmp_path), num_workers=0)
    assert split.source == str(tmp_path / parent / names[0]) and len(split.dataset) == 2 * len(classes)
    assert "hold the same files" in capsys.readouterr().out


def test_a_chosen_folder_must_exist_and_be_one_of_the_names(tmp_path):
    write_image_folder(tmp_path / "dtd" / "train", CLASSES, per_class=2)
    write_image_folder(tmp_path / "dtd" / "val", CLASSES, per_class=1)
    set_split_folders({"DTD": "test"})
    with pytest.raises(FileNotFoundError, match=r"dtd/test"):
        get_dataset("DTD", None, str(tmp_path), num_workers=0)
    with pytest.raises(ValueError, match="DTD's folder is one of val, test"):
        set_split_folders({"DTD": "valid"})
    with pytest.raises(ValueError, match="only DTD, SUN397, EuroSAT"):
        set_split_folders({"MNIST": "val"})
    with pytest.raises(ValueError, match="expected TASK=NAME"):
        split_folders(["DTD"])


def test_val_split_cut_from_train_says_so(tmp_path):
    write_image_folder(tmp_path / "dtd" / "train", CLASSES, per_class=10)
    write_image_folder(tmp_path / "dtd" / "val", CLASSES, per_class=1)
    info = get_dataset("DTDVal", None, str(tmp_path), num_workers=0).provenance
    assert info["source"] == str(tmp_path / "dtd" / "train") and info["split"] == "val" and info["n"] == 3
    assert info["cut"] == "10% of train (at most 5000), seed 0"


# ---- main.py: provenance in results.jsonl, normalised accuracy of the checkpoints being evaluated ----------
def test_every_result_line_says_where_each_dataset_came_from(workdir):
    record = cli(workdir, "--merge", "zeroshot")
    assert set(record["data"]) == set(record["accuracy"])
    for info in record["data"].values():
        assert info["source"] == "src.datasets.demo.GeneratedDataset" and info["split"] == "test" and info["n"] > 0
    line = utils.read_jsonl(workdir / "logs" / "demo-micro" / "results.jsonl")[-1]
    assert line["data"] == record["data"]
    log = sorted((workdir / "logs" / "demo-micro").glob("log_*_zeroshot.txt"))[-1].read_text()
    assert all(f"data {task}: src.datasets.demo.GeneratedDataset (test split" in log for task in record["tasks"])


def test_normalized_accuracy_follows_changed_finetuned_checkpoints(workdir):
    folder = workdir / "checkpoints" / "demo-micro"
    tasks = resolve_tasks("demo-micro")
    ft_old = cli(workdir, "--merge", "finetuned")
    ta_old = cli(workdir, "--merge", "TA")
    assert ta_old["normalized"] == pytest.approx(
        sum(100 * ta_old["accuracy"][t] / ft_old["accuracy"][t] for t in tasks) / len(tasks))

    changed = folder / tasks[0] / "finetuned.pt"  # now another task's fine-tuned model
    backup = workdir / "finetuned.bak"
    shutil.copy2(changed, backup)
    shutil.copy(folder / tasks[1] / "finetuned.pt", changed)
    try:
        ta_new = cli(workdir, "--merge", "TA")  # measures the new fine-tuned accuracies before normalising
        ft_new = cli(workdir, "--merge", "finetuned")
    finally:
        shutil.copy2(backup, changed)
    assert ta_new["checkpoints"] != ta_old["checkpoints"]
    assert ft_new["accuracy"][tasks[0]] != ft_old["accuracy"][tasks[0]]
    assert ta_new["normalized"] == pytest.approx(
        sum(100 * ta_new["accuracy"][t] / ft_new["accuracy"][t] for t in tasks) / len(tasks))
    cache = json.loads((workdir / "logs" / "demo-micro" / "individual_accuracies.json").read_text())
    # both checkpoint sets stay cached, each with the data it was measured on
    assert cache[tasks[0]][ft_old["checkpoints"]] == {"acc": ft_old["accuracy"][tasks[0]],
                                                      "data": ft_old["data"][tasks[0]]}
    assert cache[tasks[0]][ft_new["checkpoints"]]["acc"] == ft_new["accuracy"][tasks[0]]


def test_individual_cache_old_format_and_damage(workdir):
    path = workdir / "logs" / "demo-micro" / "individual_accuracies.json"
    saved = path.read_text()
    try:
        path.write_text(json.dumps({t: 1.0 for t in resolve_tasks("demo-micro")}))  # unkeyed: never trusted
        record = cli(workdir, "--merge", "finetuned")
        assert record["normalized"] == pytest.approx(100.0)
        path.write_text("{not json")
        with pytest.raises(SystemExit, match="individual_accuracies.json"):
            cli(workdir, "--merge", "zeroshot")
    finally:
        path.write_text(saved)


def test_tuned_run_logs_the_grid(workdir):
    record = cli(workdir, "--merge", "TA", "--scaling_coef", "auto", "--coef-grid", "tsv")
    assert record["scaling_coef_grid_name"] == "tsv"
    assert record["scaling_coef_grid"] == [i / 30 for i in range(1, 31)]
    assert record["scaling_coef_selected"] in record["scaling_coef_grid"]
    assert set(record["val_data"]) == {f"{t}Val" for t in record["tasks"]}
    assert all(info["split"] == "val" for info in record["val_data"].values())
    line = utils.read_jsonl(workdir / "logs" / "demo-micro" / "results.jsonl")[-1]
    assert line["scaling_coef_grid_name"] == "tsv" and line["request"]["coef_grid"] == "tsv"


def test_split_folder_flag(workdir):
    with pytest.raises(SystemExit, match="DTD's folder is one of val, test"):
        cli(workdir, "--merge", "zeroshot", "--split-folder", "DTD=valid")
    record = cli(workdir, "--merge", "zeroshot", "--split-folder", "dtd=test")
    assert folder_sets._chosen == {"DTD": "test"} and record["request"]["split_folders"] == {"DTD": "test"}
    cli(workdir, "--merge", "zeroshot")  # every run sets the choices anew
    assert folder_sets._chosen == {}


def _store_many(logs, worker, count):
    cache = FinetunedCache(logs / "m" / "individual_accuracies.json")
    for j in range(count):
        cache.store(f"ckpt{worker}", {f"T{j}": float(j)}, {f"T{j}": {"n": j}})


def test_concurrent_runs_lose_no_individual_accuracy(tmp_path):
    from tests.test_results_io import _run

    _run(_store_many, tmp_path, 2, 15)
    cache = json.loads((tmp_path / "m" / "individual_accuracies.json").read_text())
    assert cache == {f"T{j}": {f"ckpt{w}": {"acc": float(j), "data": {"n": j}} for w in range(2)} for j in range(15)}
