"""Every plot writes a non-empty PNG and PDF, from synthetic task vectors or a hand-written results.jsonl."""
import json
import shutil

import numpy as np
import pytest
import torch

from src import plots
from src.results import load_results, summarize
from src.task_vectors import TaskVector

KEYS = {  # a miniature encoder: two calibrated matrices, one excluded embedding, one bias
    "model.visual.transformer.resblocks.0.attn.out_proj.weight": (12, 12),
    "model.visual.transformer.resblocks.1.attn.out_proj.weight": (12, 12),
    "model.visual.positional_embedding": (5, 12),
    "model.visual.ln_post.bias": (12,),
}
TASKS = ["A", "B", "C", "D"]


def _task_vectors(seed=0):
    """Shared rank-2 direction plus a task-specific part: TA over-accumulates the shared one."""
    g = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(*s, generator=g) for k, s in KEYS.items()}
    return [TaskVector(vector={k: shared[k] * 0.5 + torch.randn(*s, generator=g) * 0.3 for k, s in KEYS.items()})
            for _ in TASKS]


def _check(paths):
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000
    png = [p for p in paths if p.suffix == ".png"][0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spectrum_from_synthetic_task_vectors(tmp_path):
    tvs = _task_vectors()
    layers = plots.pick_layers(tvs[0].shapes(), None)
    assert layers == list(KEYS)[:2]  # the excluded embedding and the bias are never picked
    merged = plots.merge_layers("TA", tvs, layers)
    key = layers[0]
    assert torch.allclose(merged[key], 0.3 * sum(tv.vector[key] for tv in tvs))
    data = {k: plots.spectrum_data(merged[k], [tv.vector[k] for tv in tvs], alpha=0.25) for k in layers}
    d = data[key]
    assert np.allclose(d["before"], torch.linalg.svdvals(merged[key].double()).numpy())
    assert len(d["tasks"]) == len(TASKS) and not np.allclose(d["after"], d["before"])
    _check(plots.plot_spectrum(data, tmp_path / "spectrum.png", TASKS, "TA"))


def test_coefficients_from_synthetic_task_vectors(tmp_path):
    tvs = _task_vectors()
    key = "model.visual.transformer.resblocks.1.attn.out_proj.weight"
    per_method = {}
    for method in ("TA", "TIES", "TSV-M"):
        merged = plots.merge_layers(method, tvs, [key])[key]
        per_method[method] = plots.coefficient_data(merged, [tv.vector[key] for tv in tvs], 0.25)
    s = per_method["TA"]["s"]
    assert s.shape == (12, len(TASKS))
    # gamma is K / sum_i max(alpha, s_ri)
    assert np.allclose(per_method["TA"]["gamma"], len(TASKS) / np.maximum(s, 0.25).sum(1))
    _check(plots.plot_coefficients(per_method, tmp_path / "coef", TASKS, key, {m: 0.25 for m in per_method}))


def test_pick_layers_errors():
    shapes = {k: torch.Size(s) for k, s in KEYS.items()}
    assert plots.pick_layers(shapes, ["resblocks.1"]) == [list(KEYS)[1]]
    with pytest.raises(ValueError, match="2 matches"):
        plots.pick_layers(shapes, ["out_proj"])
    with pytest.raises(ValueError, match="no match"):
        plots.pick_layers(shapes, ["nonexistent"])


def _row(merge, avg, **kw):
    row = {"model": "demo", "merge": merge, "svc": False, "alpha": 0.25, "scaling_coef": 1.0,
           "tasks": TASKS, "accuracy": {t: avg + i for i, t in enumerate(TASKS)}, "seed": 0, "options": {}}
    row.update(kw)
    return row


@pytest.fixture
def logdir(tmp_path):
    rows = [_row("zeroshot", 40.0), _row("finetuned", 90.0)]
    for c in (0.1, 0.3, 0.5, 1.0):  # fixed-coefficient sweep, TA and TA + SVC
        rows.append(_row("TA", 70 - 30 * (c - 0.3) ** 2, scaling_coef=c))
        rows.append(_row("TA", 75 - 5 * (c - 0.5) ** 2, scaling_coef=c, svc=True))
    for a in (0.25, 0.5, 0.75, 1.0):  # alpha sweep, two seeds each
        for seed in (0, 1):
            rows.append(_row("TA", 74 - 10 * (a - 0.5) ** 2 + seed, scaling_coef=0.3, svc=True, alpha=a, seed=seed))
    curve = [{"coef": c, "accuracy": {}, "avg": 68 - 20 * (c - 0.35) ** 2} for c in (0.1, 0.2, 0.35, 0.5, 0.8)]
    rows.append(_row("TA", 69.0, scaling_coef=0.35, scaling_coef_selected=0.35,
                     scaling_coef_grid=[p["coef"] for p in curve], scaling_coef_curve=curve))
    d = tmp_path / "logs" / "demo"
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_alpha_plot(logdir):
    groups = plots._sweep(load_results(logdir), "TA", "alpha", "avg", svc=True)
    xs, ys, sd = plots._curve_stats(groups["TA +SVC (coef=0.3)"]["test"])
    assert xs.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert ys[1] == pytest.approx(74 + 1.5 + 0.5)  # mean over seeds (+1.5 = mean task offset)
    assert sd[1] == pytest.approx(np.std([0, 1], ddof=1))
    paths = plots.main(["alpha", str(logdir), "--merge", "TA"])
    assert paths[0] == logdir / "alpha_TA.png"
    _check(paths)


def test_scaling_plot(logdir, tmp_path):
    groups = plots._sweep(load_results(logdir), "TA", "scaling_coef", "avg", svc=False)
    (label, g), = groups.items()
    assert label == "TA"
    assert [x for x, _ in g["val"]] == [0.1, 0.2, 0.35, 0.5, 0.8] and g["selected"] == [0.35]
    assert sorted(x for x, _ in g["test"]) == [0.1, 0.3, 0.35, 0.5, 1.0]
    _check(plots.main(["scaling", str(logdir / "results.jsonl"), "--out", str(tmp_path / "o" / "scaling.pdf")]))
    _check(plots.main(["scaling", str(logdir), "--metric", "normalized", "--out", str(tmp_path / "norm")]))
    with pytest.raises(SystemExit):  # no TIES sweep in these results
        plots.main(["scaling", str(logdir), "--merge", "TIES"])


def test_bars_plot(logdir, tmp_path):
    table = summarize(load_results(logdir))
    _check(plots.plot_bars(table, tmp_path / "bars", ["Zero-shot", "Fine-tuned", "TA (coef=0.3)"]))
    _check(plots.main(["bars", str(logdir)]))
    with pytest.raises(ValueError, match="not in the table"):
        plots.plot_bars(table, tmp_path / "x", ["nope"])


def test_spectral_commands_on_checkpoints(tmp_path):
    """spectrum/coefficients CLI on real (tiny) checkpoint files in the task_vectors layout."""
    import clip
    import src.demo.model  # noqa: F401  registers demo-micro with clip.factory
    from clip.checkpoint import to_keys

    zeroshot = to_keys(clip.create_model("demo-micro").state_dict())
    root = tmp_path / "checkpoints" / "demo-micro"
    root.mkdir(parents=True)
    torch.save(zeroshot, root / "zeroshot.pt")
    g = torch.Generator().manual_seed(0)
    shared = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in zeroshot.items()}
    for task in ("A", "B", "C"):
        ft = {k: v + shared[k] + 0.01 * torch.randn(v.shape, generator=g) if k.startswith("model.visual.") else v
              for k, v in zeroshot.items()}
        (root / task).mkdir()
        torch.save(ft, root / task / "finetuned.pt")
    common = ["--model", "demo-micro", "--base_dir", str(tmp_path), "--tasks", "A", "B", "C",
              "--logs_dir", str(tmp_path / "logs")]
    paths = plots.main(["spectrum", *common, "--layer", "out_proj", "c_fc"])
    assert paths[0] == tmp_path / "logs" / "demo-micro" / "spectrum_TA.png"
    _check(paths)
    paths = plots.main(["coefficients", *common, "--merge", "TA", "TIES", "TSV-M"])
    assert paths[0].name == "coefficients_block_0_attn.out_proj.png"
    _check(paths)
    with pytest.raises(SystemExit):  # a missing task is a clear CLI error, not a traceback
        plots.main(["spectrum", *common[:5], "D", "--logs_dir", str(tmp_path / "logs")])


def test_spectral_commands_default_to_the_models_own_tasks(tmp_path, monkeypatch, micro_zoo_files):
    """Without --tasks, a demo model's plots use its task set, as main.py does (not the 8 CLIP tasks)."""
    from src.args import default_tasks
    from src.datasets.registry import resolve_tasks
    shutil.copytree(micro_zoo_files, tmp_path / "checkpoints")
    expected = resolve_tasks(default_tasks("demo-micro"))
    seen = []
    for name in ("plot_spectrum", "plot_coefficients"):
        real = getattr(plots, name)
        monkeypatch.setattr(plots, name, lambda data, out, tasks, *rest, real=real: seen.append(list(tasks))
                            or real(data, out, tasks, *rest))
    common = ["--model", "demo-micro", "--base_dir", str(tmp_path), "--logs_dir", str(tmp_path / "logs")]
    _check(plots.main(["spectrum", *common, "--layer", "out_proj"])[:2])
    _check(plots.main(["coefficients", *common, "--merge", "TA"]))
    assert seen == [expected, expected]
