"""Embedded demo benchmark: generated data, tokenizer, model sizes and the demo-micro zoo."""
import json

import numpy as np
import pytest
import torch

from clip.demo import DEMO_MODELS, create_demo_model, get_demo_preprocess, get_demo_tokenizer, to_input
from src.demo import tasks as T
from src.demo import zoo


# ----------------------------------------------------------------------------- data
def test_generation_is_deterministic_and_seeded():
    gen = T.generate.__wrapped__  # bypass the in-memory cache: really regenerate
    x1, y1 = gen("Letters", "val", 0, 40)
    x2, y2 = gen("Letters", "val", 0, 40)
    x3, _ = gen("Letters", "val", 1, 40)
    assert x1.shape == (40, 32, 32, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    # order independence: a task's split does not depend on what was generated before
    gen("Digits", "val", 0, 5)
    assert np.array_equal(gen("Letters", "val", 0, 40)[0], x1)


@pytest.mark.parametrize("task", T.TASK_NAMES)
def test_every_task_has_balanced_labels_and_distinct_splits(task):
    C = len(T.TASKS[task].classnames)
    x, y = T.generate.__wrapped__(task, "val", 0, 4 * C)
    assert sorted(np.bincount(y, minlength=C)) == [4] * C
    xt, _ = T.generate.__wrapped__(task, "test", 0, 4 * C)
    assert not np.array_equal(x, xt)
    assert x.std() > 5  # not blank
    assert len(T.TASKS[task].templates) >= 1 and all("{" not in t("x") for t in T.TASKS[task].templates)


def test_digit_splits_use_disjoint_source_images():
    # sources are chosen by index modulo 5: train never sees a val/test source image
    rng = np.random.default_rng(0)
    a = T._digit_mask(rng, 3, True, "train")
    assert a.shape == (32, 32)
    with pytest.raises(KeyError):
        T._digit_mask(rng, 3, True, "other")


def test_pretraining_captions_name_the_class():
    imgs, caps = T.pretrain_data(("Shapes",), 16, seed=0)
    assert imgs.shape == (16, 32, 32, 3)
    assert all(any(c in cap for c in T.SHAPES) for cap in caps)


# ----------------------------------------------------------------------------- tokenizer / model
def test_tokenizer_keeps_eot_largest_and_knows_every_demo_word():
    tok = get_demo_tokenizer("demo")
    ids = tok(T.corpus())
    assert ids.shape[1] == 16 and ids.dtype == torch.long
    assert tok.eot_token_id == tok.vocab_size - 1 == int(ids.max())
    # argmax pooling lands on EOT for every text, also for texts truncated to the context length
    rows = torch.arange(len(ids))
    assert (ids[rows, ids.argmax(1)] == tok.eot_token_id).all()
    long = tok("a photo of the number seven " * 10)
    assert long[0, -1] == tok.eot_token_id and (long[0, :-1] < tok.eot_token_id).all()
    assert not (ids == 1).any(), "a demo text contains a word piece outside the compact vocabulary"
    assert tok("zz qqq")[0, 1].item() == 1  # unknown word pieces map to UNK, never out of range


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_demo_model_is_open_clip_and_runs(name):
    import open_clip
    torch.manual_seed(0)
    m = create_demo_model(name).eval()
    assert isinstance(m, open_clip.model.CLIP)
    tok = get_demo_tokenizer(name)
    assert m.vocab_size == tok.vocab_size
    x = to_input(T.generate.__wrapped__("Colors", "val", 0, 4)[0])
    with torch.no_grad():
        fi, ft = m.encode_image(x), m.encode_text(tok(["a red object", "something blue"]))
    assert fi.shape[1] == ft.shape[1] and torch.isfinite(fi).all()


def test_preprocess_matches_batched_conversion():
    from PIL import Image
    train_tf, val_tf = get_demo_preprocess("demo")
    x, _ = T.generate.__wrapped__("Arrows", "val", 0, 3)
    one = val_tf(Image.fromarray(x[0]))
    assert one.shape == (3, 32, 32)
    assert torch.equal(one, to_input(x)[0])
    assert train_tf(Image.fromarray(x[0])).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="32x32"):
        val_tf(np.zeros((64, 64, 3), np.uint8))


def test_unknown_demo_model_is_a_clear_error():
    with pytest.raises(ValueError, match="demo-micro"):
        create_demo_model("demo-large")


# ----------------------------------------------------------------------------- registry
def test_demo_tasks_are_registered():
    from src.datasets.registry import get_dataset, resolve_tasks
    assert resolve_tasks("demo") == list(T.TASK_NAMES)
    assert resolve_tasks("demo-micro") == list(zoo.CONFIGS["demo-micro"].tasks)
    _, val_tf = get_demo_preprocess("demo")
    d = get_dataset("ShapesVal", val_tf, "unused", batch_size=50, num_workers=0)
    assert len(d.test_dataset) == T.SPLIT_SIZES["val"] and d.classnames == list(T.SHAPES)
    x, y = next(iter(d.test_loader))
    ref_x, ref_y = T.generate("Shapes", "val")
    assert torch.equal(x, to_input(ref_x[:50])) and torch.equal(y, torch.from_numpy(ref_y[:50]))
    zx, zy = zoo.eval_loader("Shapes", "val").dataset.tensors  # the zoo's and demo_quality's preloaded copy
    assert torch.equal(zx[:50], x) and torch.equal(zy[:50], y)


# ----------------------------------------------------------------------------- micro zoo
@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    return zoo.ensure_zoo("demo-micro", str(base)), base


def test_micro_zoo_files_and_keys(micro_zoo):
    path, _ = micro_zoo
    cfg = zoo.CONFIGS["demo-micro"]
    zs = torch.load(path / "zeroshot.pt", weights_only=True)
    ref = create_demo_model("demo-micro").state_dict()
    expected = {f"model.{k}" for k in ref if not k.startswith("transformer.")}
    assert set(zs) == expected
    assert {"model.visual.proj", "model.token_embedding.weight", "model.logit_scale", "model.text_projection"} <= set(zs)
    assert torch.isclose(zs["model.logit_scale"].exp(), torch.tensor(zoo.HEAD_SCALE))
    for task in cfg.tasks:
        ft = torch.load(path / task / "finetuned.pt", weights_only=True)
        assert set(ft) == expected
        changed = {k for k in zs if not torch.equal(zs[k], ft[k])}
        assert changed and all(k.startswith("model.visual.") for k in changed)
        assert (path / f"head_{task}.pt").exists()
    meta = json.loads((path / "zoo.json").read_text())
    assert set(meta["stats"]["finetuned"]) == set(cfg.tasks)
    assert set(meta["stats"]["stages"]) >= {"data", "pretrain", "finetune"}


def test_micro_zoo_loads_through_the_pipeline_readers(micro_zoo):
    path, _ = micro_zoo
    clip = pytest.importorskip("clip")
    if not hasattr(clip, "load_state_dict") or not hasattr(clip, "build_image_encoder"):
        pytest.skip("clip loaders not available yet")
    task = zoo.CONFIGS["demo-micro"].tasks[0]
    sd = clip.load_state_dict(path / task / "finetuned.pt")
    enc = clip.build_image_encoder("demo-micro", sd)
    head = clip.load_head(path / f"head_{task}.pt")
    x, y = T.generate(task, "test")
    with torch.no_grad():
        logits = head(enc(to_input(x[:64])))
    assert logits.shape == (64, len(T.TASKS[task].classnames))
    # same numbers as the zoo's own evaluation path
    ref = create_demo_model("demo-micro").eval()
    ref.load_state_dict({k[6:]: v for k, v in torch.load(path / task / "finetuned.pt").items()}, strict=False)
    w = head.weight.detach()
    with torch.no_grad():
        f = torch.nn.functional.normalize(ref.encode_image(to_input(x[:64])), dim=-1)
    assert torch.allclose(logits, f @ w.T, atol=1e-4)


def test_ensure_zoo_reuses_and_rebuilds_on_config_change(micro_zoo, monkeypatch):
    path, base = micro_zoo
    stamp = (path / "zeroshot.pt").stat().st_mtime_ns
    assert zoo.ensure_zoo("demo-micro", str(base)) == path
    assert (path / "zeroshot.pt").stat().st_mtime_ns == stamp  # reused, not rebuilt

    calls = []
    monkeypatch.setattr(zoo, "build_zoo", lambda *a, **k: calls.append((a, k)) or path)
    zoo.ensure_zoo("demo-micro", str(base), seed=1)  # another seed: a different zoo
    zoo.ensure_zoo("demo-micro", str(base), rebuild=True)
    import dataclasses
    monkeypatch.setitem(zoo.CONFIGS, "demo-micro", dataclasses.replace(zoo.CONFIGS["demo-micro"], ft_lr=1.0))
    zoo.ensure_zoo("demo-micro", str(base))
    assert len(calls) == 3


def test_changing_only_finetuning_reuses_the_pretrained_stage(tmp_path):
    import dataclasses
    cfg = zoo.CONFIGS["demo-micro"]
    small = dataclasses.replace(cfg, tasks=cfg.tasks[:1])
    out = zoo.build_zoo("demo-micro", tmp_path, cfg=small, report=False)
    stamp = (out / "zeroshot.pt").stat().st_mtime_ns
    task = small.tasks[0]
    ft1 = torch.load(out / task / "finetuned.pt", weights_only=True)
    zoo.build_zoo("demo-micro", tmp_path, cfg=dataclasses.replace(small, ft_steps=3), report=False)
    assert (out / "zeroshot.pt").stat().st_mtime_ns == stamp
    ft2 = torch.load(out / task / "finetuned.pt", weights_only=True)
    assert not torch.equal(ft1["model.visual.proj"], ft2["model.visual.proj"])
    zoo.build_zoo("demo-micro", tmp_path, cfg=small, report=False, reuse_pretrain=False)
    assert (out / "zeroshot.pt").stat().st_mtime_ns != stamp
    ft3 = torch.load(out / task / "finetuned.pt", weights_only=True)
    assert all(torch.equal(ft1[k], ft3[k]) for k in ft1)  # reused or rebuilt: the same zoo


def test_micro_zoo_build_is_deterministic(micro_zoo, tmp_path):
    path, _ = micro_zoo
    cfg = zoo.CONFIGS["demo-micro"]
    import dataclasses
    small = dataclasses.replace(cfg, tasks=cfg.tasks[:1])
    a = zoo.build_zoo("demo-micro", tmp_path / "a", cfg=small, report=False)
    b = zoo.build_zoo("demo-micro", tmp_path / "b", cfg=small, report=False)
    task = small.tasks[0]
    sa = torch.load(a / task / "finetuned.pt", weights_only=True)
    sb = torch.load(b / task / "finetuned.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_report_matches_the_pipeline_evaluation(micro_zoo):
    """The zoo's quality report (zero-shot, fine-tuned, TA at the chosen lambda) is what main.py's
    path gives: clip loaders -> TaskVector -> merge_func TA -> evaluate_tasks over the registry."""
    from types import SimpleNamespace

    import clip
    import merge_func
    from src.eval import evaluate_tasks
    from src.task_vectors import TaskVector

    path, _ = micro_zoo
    stats = json.loads((path / "zoo.json").read_text())["stats"]
    tasks = list(zoo.CONFIGS["demo-micro"].tasks)
    zs = clip.load_state_dict(path / "zeroshot.pt").materialize()
    fts = {t: clip.load_state_dict(path / t / "finetuned.pt").materialize() for t in tasks}
    heads = {t: clip.load_head(path / f"head_{t}.pt") for t in tasks}
    _, val_tf = clip.get_preprocess("demo-micro")

    def acc(sd):
        enc = clip.build_image_encoder("demo-micro", sd)
        return evaluate_tasks(enc, tasks, heads, val_tf, "unused", device="cpu", num_workers=0, progress=False)

    one_image = 100.0 / T.SPLIT_SIZES["test"]  # batch sizes differ: allow one flipped near-tie
    assert acc(zs) == pytest.approx(stats["zeroshot"], abs=one_image + 1e-9)
    for t in tasks:
        assert acc(fts[t])[t] == pytest.approx(stats["finetuned"][t], abs=one_image + 1e-9)
    ta = stats["task_arithmetic"]
    assert ta["best_lambda"] in zoo.default_grid("TA")
    curve = ta["val_curve_normalized"]  # chosen like main.py --scaling_coef auto
    assert curve[str(ta["best_lambda"])] == max(curve.values())
    merged = merge_func.get_merge_method("TA")(None, [TaskVector(zs, fts[t]) for t in tasks],
                                               SimpleNamespace(scaling_coef=ta["best_lambda"]))
    assert acc(merged.apply_to(zs)) == pytest.approx(ta["ta_val_tuned"], abs=one_image + 1e-9)


def test_interference_probes_agree_with_the_build_report(micro_zoo):
    """benchmarks/demo_interference.py measures through the same path as the zoo's report: its
    zero-shot and fine-tuned rows match zoo.json, lam = 1 on a task's own vector is its fine-tuned
    model, lam = 0 is the zero-shot model, and the forgetting diagonal is each task's own gain."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_interference.py"
    spec = importlib.util.spec_from_file_location("demo_interference", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path, _ = micro_zoo
    stats = json.loads((path / "zoo.json").read_text())["stats"]
    res = mod.interference(path, "demo-micro", "test", (0.0, 1.0))
    p, tasks = res["probes"], res["tasks"]
    assert tasks == list(zoo.CONFIGS["demo-micro"].tasks)
    assert p["zero-shot"] == pytest.approx(stats["zeroshot"]) and p["fine-tuned"] == pytest.approx(stats["finetuned"])
    assert p["self 1.0"] == p["fine-tuned"]
    for name in ("self", "others", "shared", "specific", "TA"):
        assert p[f"{name} 0.0"] == p["zero-shot"]
    for t in tasks:
        assert res["forgetting"][t][t] == pytest.approx(p["fine-tuned"][t] - p["zero-shot"][t])
    assert "mean off-diagonal change" in mod.format_table(res)
