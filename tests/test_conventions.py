"""Evaluation conventions: the checkpoints' reference code decides class names, templates and data."""
import sys
from types import SimpleNamespace

import pytest

import main
import utils
from src.datasets import conventions
from src.datasets import templates as T
from src.datasets.registry import TASK_SETS, get_spec


def prompts(spec_or_templates, name="x"):
    templates = getattr(spec_or_templates, "templates", spec_or_templates)
    return [t(name) for t in templates]


def test_convention_follows_the_layout_unless_overridden():
    assert [conventions.convention_for_layout(lay) for lay in ("task_vectors", "tsv", "hf")] == \
        ["task_vectors", "tsv", "fusionbench"]
    assert conventions.resolve("auto", "hf") == "fusionbench" and conventions.resolve(None, "tsv") == "tsv"
    assert conventions.resolve("tsv", "hf") == "tsv"
    with pytest.raises(ValueError, match="unknown convention 'fb'"):
        conventions.resolve("fb", "hf")
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        conventions.convention_for_layout("zip")


def test_stl10_templates_per_convention():
    a_the = ["a photo of a x.", "a photo of the x."]
    assert prompts(get_spec("STL10", "task_vectors")) == a_the  # task_vectors src/datasets/templates.py
    assert prompts(get_spec("STL10", "fusionbench")) == a_the  # fusion_bench .../stl10.py
    tsv = prompts(get_spec("STL10Val", "tsv"))  # TSV: cifar10_stl10_template
    assert len(tsv) == 18 and tsv == prompts(get_spec("CIFAR10")) and tsv[1] == "a blurry photo of a x."
    assert prompts(get_spec("STL10")) == a_the  # no convention: the registered (task_vectors) definitions


def test_fusionbench_class_names_and_templates():
    fb = {task: get_spec(task, "fusionbench") for task in TASK_SETS[20]}
    assert [fb["Flowers102"].classnames[i] for i in (15, 59, 92)] == ["globe-flower", "pink-yellow dahlia?",
                                                                       "ball moss"]
    assert fb["OxfordIIITPet"].classnames[:2] == ["abyssinian", "american_bulldog"]
    assert fb["CIFAR100"].classnames[26] == "cra" and fb["CIFAR100"].classnames[25] == "couch"
    assert fb["FER2013"].classnames == ["angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"]
    assert fb["Food101"].classnames[:2] == ["apple pie", "baby back ribs"]
    assert fb["FashionMNIST"].classnames[0] == "T - shirt / top" and fb["FashionMNIST"].classnames[9] == "Ankle boot"
    assert fb["KMNIST"].classnames == list("おきすつなはまやれを")
    assert fb["EMNIST"].classnames == list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert prompts(fb["EMNIST"], "Q") == ['a photo of the digit character: "Q".']
    changed = {"Flowers102", "OxfordIIITPet", "CIFAR100", "FER2013", "Food101", "FashionMNIST", "KMNIST", "EMNIST"}
    for task, spec in fb.items():  # prescribed names win over names found in the data; the rest are unchanged
        assert spec.fixed_names == (task in changed)
        base = get_spec(task)
        assert len(spec.classnames) == len(base.classnames) or task == "EMNIST"
        assert prompts(spec) == prompts(base) or task == "EMNIST"
        if task not in changed:
            assert spec.classnames == base.classnames
    # the class names of FER2013 keep TSV's label order: same emotion, first word of TSV's list
    assert fb["FER2013"].classnames == [names[0] for names in T.FER2013]


def test_same_definitions_and_emnist_layout_check():
    assert conventions.same_definitions("MNIST", "fusionbench", "tsv")
    assert not conventions.same_definitions("STL10", "tsv", "task_vectors")
    assert not conventions.same_definitions("EMNIST", "fusionbench", "tsv")
    assert conventions.same_definitions("STL10", "fusionbench", "task_vectors")
    conventions.check_layout("hf", "fusionbench", ["EMNIST", "MNIST"])
    conventions.check_layout("hf", "tsv", ["MNIST", "STL10"])  # only the data variant is checked
    with pytest.raises(ValueError, match=r"EMNIST: the 'hf' checkpoints .* letters .*--convention tsv .* digits"):
        conventions.check_layout("hf", "tsv", ["MNIST", "EMNIST"])
    with pytest.raises(ValueError, match="EMNIST.*--convention fusionbench"):
        conventions.check_layout("tsv", "fusionbench", ["EMNISTVal"])


def test_results_line_records_the_convention(workdir):
    common = ["--model", "demo-micro", "--base_dir", str(workdir), "--logs", str(workdir / "logs"), "--threads", "1",
              "--no-progress", "--num-workers", "0", "--merge", "zeroshot"]
    auto = main.main(common)
    forced = main.main(common + ["--convention", "tsv"])
    assert auto["convention"] == "task_vectors" and forced["convention"] == "tsv"
    lines = utils.read_jsonl(workdir / "logs" / "demo-micro" / "results.jsonl")
    assert [line["convention"] for line in lines] == ["task_vectors", "tsv"]
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["--convention", "openai"])


def test_main_refuses_before_any_work(monkeypatch):
    """FusionBench's EMNIST letters fine-tune under another convention's EMNIST digits, or PCAM without h5py: a
    one-line error before any checkpoint is read."""
    def fake_checkpoints(layout):
        return SimpleNamespace(layout=layout, check=lambda *a: pytest.fail("checkpoints were read"))

    common = ["--model", "ViT-B-32", "--merge", "TA", "--num-workers", "0", "--logs", "unused"]
    monkeypatch.setattr(main.clip, "find_checkpoints", lambda *a, **k: fake_checkpoints("hf"))
    with pytest.raises(SystemExit, match="EMNIST: the 'hf' checkpoints .* letters .*--convention tsv .* digits"):
        main.main(common + ["--tasks", "MNIST,EMNIST", "--convention", "tsv"])
    monkeypatch.setattr(main.clip, "find_checkpoints", lambda *a, **k: fake_checkpoints("tsv"))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(SystemExit, match="PCAM needs the optional package h5py.*pip install h5py"):
        main.main(common + ["--tasks", "MNIST,PCAM"])
