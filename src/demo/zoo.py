"""Builds the checkpoint zoo of the embedded demo benchmark.

Stages: generate data -> contrastive pretraining of a small CLIP on clean captioned images
(-> zeroshot.pt) -> zero-shot heads from the text tower and the task templates (-> head_<Task>.pt)
-> fine-tuning of the image encoder on each task with its head frozen, task_vectors recipe
(AdamW, linear warmup + cosine, grad-norm clip 1.0) (-> <Task>/finetuned.pt) -> a quality report
(zero-shot, fine-tuned and task-arithmetic accuracies) stored with the build signature in zoo.json.

Files follow the real release layout under <base_dir>/<model>/ and the key convention of the
pipeline (`model.` + open_clip CLIP keys, text transformer removed), so everything downstream
runs unchanged.  Usage: python -m src.demo.zoo --model demo [--rebuild] [--seed 0]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import clip
from src.demo import tasks as T
from src.demo.model import DEMO_MODELS, create_demo_model, get_demo_tokenizer, to_input
from src.eval import evaluate
from src.heads import build_zeroshot_head, load_head, save_head
from src.modeling import build_image_encoder
from src.task_vectors import TaskVector
from src.tuning import apply_in_place, default_grid, select_coefficient

ZOO_VERSION = 2  # 2: the issue-14 data design and vocabulary. Bump when generated data or the recipe change in a way the config does not capture
HEAD_SCALE = 100.0  # exp(logit_scale) of the released heads, as OpenAI CLIP's final value


@dataclass(frozen=True)
class ZooConfig:
    tasks: tuple[str, ...]
    pretrain_per_task: int  # clean captioned images per task
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    ft_steps: int
    ft_batch: int
    ft_lr: float
    weight_decay: float = 0.1
    warmup: float = 0.1  # fraction of steps
    grad_clip: float = 1.0
    threads: int = 1  # results depend on the float reduction order: record it
    version: int = ZOO_VERSION
    # the data design: the fields of src.demo.tasks.Design, with its defaults
    name_rate: float = T.DEFAULT_DESIGN.name_rate
    tint: float = T.DEFAULT_DESIGN.tint
    hue_drift: float = T.DEFAULT_DESIGN.hue_drift
    unnamed: float = T.DEFAULT_DESIGN.unnamed
    centred: bool = T.DEFAULT_DESIGN.centred
    # tasks per pretraining batch: 0 draws batches from every task; k > 0 draws each batch from k random
    # tasks, so that the in-batch negatives are other classes of the same task (class features, not task id)
    pretrain_group: int = 0

    @property
    def design(self) -> T.Design:
        return T.Design(**{f.name: getattr(self, f.name) for f in dataclasses.fields(T.Design)})


# Design fields removed after commit 2c6eac4, which has them (they rebuilt data designs that did not work),
# by the config field they followed. Signatures still record them at the one value every zoo since has,
# in their old places, so that a config's signature, and the zoo.json and pretrain.json of a zoo built
# before the removal, stay byte for byte what they were: such a zoo is reused, not rebuilt.
RETIRED_FIELDS = {"version": {"shift": 0.0}, "name_rate": {"style": False, "frame": 0.0}}


CONFIGS: dict[str, ZooConfig] = {
    "demo": ZooConfig(tasks=T.TASK_NAMES, pretrain_per_task=6000, pretrain_steps=900, pretrain_batch=256,
                      pretrain_lr=1.5e-3, ft_steps=200, ft_batch=64, ft_lr=1e-4),
    # plumbing only (tests, CI): seconds to build, accuracy not meaningful
    "demo-micro": ZooConfig(tasks=("Digits", "Shapes", "Colors"), pretrain_per_task=256, pretrain_steps=80,
                            pretrain_batch=64, pretrain_lr=2e-3, ft_steps=16, ft_batch=32, ft_lr=5e-4),
}


# ----------------------------------------------------------------------------- helpers
def encoder_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ImageEncoder keys: `model.` + CLIP keys, the text transformer dropped (as in the real files)."""
    return {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("transformer.")}


def _schedule(step: int, total: int, lr: float, warmup: float) -> float:
    w = max(1, int(warmup * total))
    if step < w:
        return lr * (step + 1) / w
    return 0.5 * lr * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def _scheduled_batches(steps, n: int, batch: int, g: torch.Generator, opt, lr: float, warmup: float):
    """Yield (step, indices) over reshuffled epochs of n examples, setting the warmup + cosine
    learning rate of ``opt`` before each step. Shuffles draw from ``g`` at the top of a step,
    before the step's own augmentation draws."""
    total = len(steps)
    perm, pos = torch.randperm(n, generator=g), 0
    for step in steps:
        if pos + batch > len(perm):
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        for group in opt.param_groups:
            group["lr"] = _schedule(step, total, lr, warmup)
        yield step, idx


def _grouped_batches(steps, n_tasks: int, per_task: int, group: int, batch: int, g: torch.Generator, opt,
                     lr: float, warmup: float):
    """As _scheduled_batches, but each batch holds batch // group random images of each of `group`
    random tasks (the pretraining data is laid out task after task, per_task images each)."""
    total = len(steps)
    for step in steps:
        chosen = torch.randperm(n_tasks, generator=g)[:group]
        idx = torch.cat([t * per_task + torch.randint(0, per_task, (batch // group,), generator=g) for t in chosen])
        for grp in opt.param_groups:
            grp["lr"] = _schedule(step, total, lr, warmup)
        yield step, idx


def _translate(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random per-image translation by up to `pad` pixels with edge padding (uint8 NHWC batch)."""
    n, h, w, _ = x.shape
    xp = F.pad(x.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate")
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    iy = (off[:, 0, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    ix = (off[:, 1, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    out = xp[torch.arange(n)[:, None, None], :, iy, ix]  # n, h, w, c
    return out.round().to(torch.uint8)


def _inputs(x_uint8: torch.Tensor) -> torch.Tensor:
    return to_input(x_uint8.numpy())


def _adamw(params, lr: float, wd: float) -> torch.optim.AdamW:
    # task_vectors applies weight decay to every trainable parameter
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


# ----------------------------------------------------------------------------- stages
def pretrain(model, tokenizer, cfg: ZooConfig, seed: int, log) -> dict:
    """CLIP contrastive pretraining on clean captioned images of every task domain."""
    t0 = time.time()
    imgs, caps = T.pretrain_data(cfg.tasks, cfg.pretrain_per_task, seed, cfg.design)
    uniq, inverse = np.unique(np.array(caps), return_inverse=True)
    cap_idx = torch.from_numpy(inverse.reshape(-1))
    tokens = tokenizer(list(uniq))
    x_all = torch.from_numpy(imgs)
    log(f"pretraining data: {len(caps)} images, {len(uniq)} distinct captions ({time.time() - t0:.1f} s)")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = _adamw(model.parameters(), cfg.pretrain_lr, cfg.weight_decay)
    model.train()
    losses = []
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain", unit="step", leave=False)
    batches = _scheduled_batches(bar, len(caps), cfg.pretrain_batch, g, opt, cfg.pretrain_lr, cfg.warmup)
    if cfg.pretrain_group:
        batches = _grouped_batches(bar, len(cfg.tasks), cfg.pretrain_per_task, cfg.pretrain_group,
                                   cfg.pretrain_batch, g, opt, cfg.pretrain_lr, cfg.warmup)
    for step, idx in batches:
        img = F.normalize(model.encode_image(_inputs(_translate(x_all[idx], g))), dim=-1)
        # one text per distinct caption in the batch; duplicates share the target column
        ci = cap_idx[idx]
        u, inv = torch.unique(ci, return_inverse=True)
        txt = F.normalize(model.encode_text(tokens[u]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # B x U
        loss_i = F.cross_entropy(logits, inv)
        # text -> image: each distinct caption against all images; targets spread over its images
        target = (inv[None, :] == torch.arange(len(u))[:, None]).float()
        loss_t = -(target / target.sum(1, keepdim=True) * logits.T.log_softmax(-1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    learned_scale = model.logit_scale.exp().item()
    with torch.no_grad():  # the released heads carry exp(logit_scale) = 100 (see HEAD_SCALE)
        model.logit_scale.fill_(math.log(HEAD_SCALE))
    model.eval()
    return {"seconds": time.time() - t0, "final_loss": float(np.mean(losses[-20:])),
            "learned_logit_scale": learned_scale}


def zeroshot_head(model, tokenizer, task: str):
    """The task's zero-shot head, built by the pipeline's own head builder."""
    spec = T.TASKS[task]
    return build_zeroshot_head(model, tokenizer, list(spec.classnames), list(spec.templates))


def head_weight(head) -> torch.Tensor:
    return head.weight.detach()


def head_cosine(w: torch.Tensor) -> float:
    """Mean off-diagonal cosine between class embeddings (1.0 = classes indistinguishable)."""
    w = F.normalize(w.float(), dim=-1)
    c = w @ w.T
    n = len(w)
    return float((c.sum() - c.diag().sum()) / (n * (n - 1)))


@functools.lru_cache(maxsize=None)
def eval_loader(task: str, split: str, design: T.Design = T.DEFAULT_DESIGN) -> DataLoader:
    """A generated split as preprocessed tensors, made once: the same batches as the registry's
    dataset with the demo val transform (tests/test_demo.py checks it), without a PIL round trip."""
    x, y = T.generate(task, split, design=design)
    return DataLoader(TensorDataset(to_input(x), torch.from_numpy(y.copy())), batch_size=500)


def accuracy(encoder: torch.nn.Module, head, task: str, split: str,
             design: T.Design = T.DEFAULT_DESIGN) -> float:
    """Top-1 % of head(encoder(x)) over a generated split, through the pipeline's evaluate()."""
    return evaluate(encoder, head, eval_loader(task, split, design), "cpu", progress=False)


def stored_config(path: str | Path) -> ZooConfig:
    """The ZooConfig a built zoo was made with (from its zoo.json), e.g. for its data design."""
    c = json.loads((Path(path) / "zoo.json").read_text())["signature"]["config"]
    for name, value in (kv for retired in RETIRED_FIELDS.values() for kv in retired.items()):
        if c.pop(name, value) != value:
            raise ValueError(f"{path} was built with the data design field {name}, which this code no longer "
                             "has: commit 2c6eac4 makes that data")
    return ZooConfig(**{**c, "tasks": tuple(c["tasks"])})


def load_built(path: str | Path, tasks) -> tuple[dict[str, torch.Tensor], dict, dict[str, TaskVector]]:
    """A built zoo read back through the pipeline's safe loaders, eagerly, for repeated in-place
    evaluation: (zero-shot state dict, head per task, task vector per task)."""
    path = Path(path)
    zs = clip.load_state_dict(path / "zeroshot.pt").materialize()
    heads = {t: load_head(path / f"head_{t}.pt") for t in tasks}
    tvs = {t: TaskVector(zs, clip.load_state_dict(path / t / "finetuned.pt")).materialize() for t in tasks}
    return zs, heads, tvs


def finetune(model, w: torch.Tensor, task: str, cfg: ZooConfig, seed: int) -> dict:
    """Fine-tunes model.visual on the task's train split with the zero-shot head `w` frozen."""
    t0 = time.time()
    x, y = T.generate(task, "train", design=cfg.design)
    x, y = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    g = torch.Generator().manual_seed(seed * 1000 + T.TASK_NAMES.index(task))
    params = list(model.visual.parameters())
    opt = _adamw(params, cfg.ft_lr, cfg.weight_decay)
    model.train()
    losses = []
    bar = tqdm(range(cfg.ft_steps), desc=f"finetune {task}", unit="step", leave=False)
    for step, idx in _scheduled_batches(bar, len(y), cfg.ft_batch, g, opt, cfg.ft_lr, cfg.warmup):
        f = F.normalize(model.encode_image(_inputs(_translate(x[idx], g))), dim=-1)
        loss = F.cross_entropy(f @ w.T, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    return {"seconds": time.time() - t0, "final_loss": float(np.mean(losses[-10:]))}


def task_arithmetic_report(model_name: str, zs: dict, fts: dict, heads: dict, tasks,
                           design: T.Design = T.DEFAULT_DESIGN) -> dict:
    """TA (pretrained + lam * sum of task vectors) with lam chosen on val as `main.py --scaling_coef auto`
    does (average normalised accuracy), through the pipeline's own TaskVector, apply_in_place and
    select_coefficient: a build-time sanity check."""
    encoder = build_image_encoder(model_name, zs).eval()
    params = encoder.state_dict()
    vectors = {t: TaskVector(zs, fts[t]).materialize() for t in tasks}
    total = sum(vectors.values())
    grid = default_grid("TA")
    bar = tqdm(total=len(tasks) + len(grid) + 2, desc="report (TA, lambda on val)", unit="model", leave=False)
    individual_val = {}
    for t in tasks:
        apply_in_place(params, zs, vectors[t], 1.0)
        individual_val[t] = accuracy(encoder, heads[t], t, "val", design)
        bar.update()

    def score(lam: float, split: str = "val") -> dict[str, float]:
        apply_in_place(params, zs, total, lam)
        bar.update()
        return {t: accuracy(encoder, heads[t], t, split, design) for t in tasks}

    sel = select_coefficient(grid, score, individual=individual_val)
    out = {"val_curve": {p["coef"]: p["avg"] for p in sel.curve},
           "val_curve_normalized": {p["coef"]: p["normalized"] for p in sel.curve},
           "best_lambda": sel.best, "ta_0.3": score(0.3, "test"), "ta_val_tuned": score(sel.best, "test")}
    bar.close()
    return out


# ----------------------------------------------------------------------------- build / reuse
def _config_record(cfg: ZooConfig) -> dict:
    """The config as signatures store it: its fields, with the RETIRED_FIELDS in their old places."""
    out = {}
    for name, value in dataclasses.asdict(cfg).items():
        out[name] = value
        out.update(RETIRED_FIELDS.get(name, {}))
    return out


def _signature(model_name: str, cfg: ZooConfig, seed: int) -> dict:
    # JSON round trip so that it compares equal to the stored copy (tuples become lists)
    return json.loads(json.dumps({"model": model_name, "seed": seed, "config": _config_record(cfg),
            "vocab_size": get_demo_tokenizer(model_name).vocab_size, "torch": torch.__version__}))


def _pretrain_signature(model_name: str, cfg: ZooConfig, seed: int) -> dict:
    # "style" is a retired field, kept so that the stored pretraining signatures still match
    keep = ("tasks", "pretrain_per_task", "pretrain_steps", "pretrain_batch", "pretrain_lr", "weight_decay",
            "warmup", "grad_clip", "threads", "version", "name_rate", "style", "pretrain_group", "centred",
            "unnamed")
    sig = _signature(model_name, cfg, seed)
    sig["config"] = {k: v for k, v in sig["config"].items() if k in keep}
    return sig


def _pretrain_cached(out: Path, cfg: ZooConfig, sig: dict) -> bool:
    try:
        stored = json.loads((out / "pretrain.json").read_text())["signature"]
    except (OSError, ValueError, KeyError):
        return False
    files = [out / "zeroshot.pt"] + [out / f"head_{t}.pt" for t in cfg.tasks]
    return stored == sig and all(f.exists() for f in files)


def build_zoo(model_name: str, base_dir: str | Path, seed: int = 0, cfg: ZooConfig | None = None,
              report: bool = True, reuse_pretrain: bool = True, reason: str = "requested") -> Path:
    """Builds the zoo into <base_dir>/<model_name>/ and returns that folder. The pretraining stage
    (zeroshot.pt and heads) is reused when its part of the config is unchanged, unless
    `reuse_pretrain` is False."""
    if model_name not in DEMO_MODELS:
        raise ValueError(f"no demo zoo for model {model_name!r}; choose one of {', '.join(DEMO_MODELS)}")
    cfg = cfg or CONFIGS[model_name]
    out = Path(base_dir) / model_name
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").unlink(missing_ok=True)  # an interrupted build must not look complete
    log = tqdm.write
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        t_start = time.time()
        stats: dict = {"stages": {}}
        log(f"[demo zoo] building {model_name} (seed {seed}) into {out}; "
            f"rough estimate on 1 CPU thread: {_estimate(model_name, cfg):.0f} s. Why: {reason}. It is built once "
            "and reused while its config and seed are unchanged")
        t0 = time.time()
        for task in tqdm(cfg.tasks, desc="generate data", unit="task", leave=False):
            for split in T.SPLITS:
                T.generate(task, split, design=cfg.design)
        stats["stages"]["data"] = time.time() - t0
        log(f"[demo zoo] data: {stats['stages']['data']:.1f} s")

        torch.manual_seed(seed)
        model = create_demo_model(model_name)
        tokenizer = get_demo_tokenizer(model_name)
        pre_sig = _pretrain_signature(model_name, cfg, seed)
        heads = {}
        if reuse_pretrain and _pretrain_cached(out, cfg, pre_sig):
            # the pretraining stage is unchanged: reuse zeroshot.pt and the heads it produced
            zs = clip.load_state_dict(out / "zeroshot.pt").materialize()
            model.load_state_dict({k[len("model."):]: v for k, v in zs.items()}, strict=False)
            model.eval()
            stats["pretrain"] = json.loads((out / "pretrain.json").read_text())["stats"]
            stats["stages"]["pretrain"] = 0.0
            for task in cfg.tasks:
                heads[task] = load_head(out / f"head_{task}.pt")
            log(f"[demo zoo] pretrain: reusing {out / 'zeroshot.pt'} (same pretraining config)")
        else:
            (out / "pretrain.json").unlink(missing_ok=True)
            stats["pretrain"] = pretrain(model, tokenizer, cfg, seed, log)
            stats["stages"]["pretrain"] = stats["pretrain"]["seconds"]
            log(f"[demo zoo] pretrain: {stats['pretrain']['seconds']:.1f} s, loss {stats['pretrain']['final_loss']:.3f}")
            zs = encoder_state_dict(model)
            torch.save(zs, out / "zeroshot.pt")
            for task in cfg.tasks:
                heads[task] = zeroshot_head(model, tokenizer, task)
                save_head(heads[task], out / f"head_{task}.pt")
            (out / "pretrain.json").write_text(json.dumps({"signature": pre_sig, "stats": stats["pretrain"]}))

        t0 = time.time()
        weights = {t: head_weight(heads[t]).float() for t in cfg.tasks}  # frozen heads of fine-tuning
        stats["head_cosine"] = {t: head_cosine(w) for t, w in weights.items()}
        stats["zeroshot"] = {t: accuracy(model.visual, heads[t], t, "test", cfg.design) for t in cfg.tasks}
        stats["stages"]["zeroshot_eval"] = time.time() - t0

        t0 = time.time()
        fts, stats["finetune"], stats["finetuned"] = {}, {}, {}
        for task in tqdm(cfg.tasks, desc="fine-tune tasks", unit="task"):
            model.load_state_dict({k[len("model."):]: v for k, v in zs.items()}, strict=False)
            stats["finetune"][task] = finetune(model, weights[task], task, cfg, seed)
            fts[task] = encoder_state_dict(model)
            (out / task).mkdir(exist_ok=True)
            torch.save(fts[task], out / task / "finetuned.pt")
            stats["finetuned"][task] = accuracy(model.visual, heads[task], task, "test", cfg.design)
            log(f"[demo zoo] {task}: zero-shot {stats['zeroshot'][task]:.1f} -> fine-tuned "
                f"{stats['finetuned'][task]:.1f} ({stats['finetune'][task]['seconds']:.1f} s)")
        stats["stages"]["finetune"] = time.time() - t0

        if report:
            t0 = time.time()
            stats["task_arithmetic"] = task_arithmetic_report(model_name, zs, fts, heads, cfg.tasks, cfg.design)
            stats["stages"]["report"] = time.time() - t0
        stats["total_seconds"] = time.time() - t_start
        meta = {"signature": _signature(model_name, cfg, seed), "stats": stats}
        (out / "zoo.json").write_text(json.dumps(meta, indent=1))
        log(format_report(meta))
        return out
    finally:
        torch.set_num_threads(threads)


def _estimate(model_name: str, cfg: ZooConfig) -> float:
    ips = {"demo": 600.0, "demo-micro": 10000.0}[model_name]  # training images/s, 1 thread
    imgs = cfg.pretrain_steps * cfg.pretrain_batch * 1.2 + len(cfg.tasks) * cfg.ft_steps * cfg.ft_batch
    return imgs / ips + 4.0 * len(cfg.tasks)


def ensure_zoo(model_name: str, base_dir: str, rebuild: bool = False, seed: int = 0,
               cfg: ZooConfig | None = None) -> Path:
    """<base_dir>/<model_name>/ with a complete zoo: reused when its stored signature matches the
    config (`cfg`, default the model's) and seed, (re)built otherwise or when `rebuild` is set."""
    out = Path(base_dir) / model_name
    meta_path = out / "zoo.json"
    if not rebuild and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        cfg = cfg or CONFIGS[model_name]
        files = [out / "zeroshot.pt"] + [out / t / "finetuned.pt" for t in cfg.tasks] + \
                [out / f"head_{t}.pt" for t in cfg.tasks]
        if meta.get("signature") == _signature(model_name, cfg, seed) and all(f.exists() for f in files):
            return out
        tqdm.write(f"[demo zoo] {meta_path} does not match the current config or files are missing: rebuilding")
    reason = ("--rebuild" if rebuild else "its config or seed changed, or files are missing" if meta_path.exists()
              else f"first use: no zoo in {out}, made offline from generated data")
    return build_zoo(model_name, base_dir, seed=seed, cfg=cfg, reuse_pretrain=not rebuild, reason=reason)


def format_report(meta: dict) -> str:
    s = meta["stats"]
    tasks = list(s["zeroshot"])
    rows = [("head cosine", s["head_cosine"]), ("zero-shot", s["zeroshot"]), ("fine-tuned", s["finetuned"])]
    ta = s.get("task_arithmetic")
    if ta:
        rows += [("TA 0.3", ta["ta_0.3"]), (f"TA val ({ta['best_lambda']})", ta["ta_val_tuned"])]
    w = max(len(t) for t in tasks) + 1
    lines = [f"{'':18}" + "".join(f"{t[:w]:>{w}}" for t in tasks) + f"{'avg':>7}"]
    for name, d in rows:
        fmt = "{:.2f}" if name == "head cosine" else "{:.1f}"
        lines.append(f"{name:18}" + "".join(f"{fmt.format(d[t]):>{w}}" for t in tasks)
                     + f"{fmt.format(np.mean([d[t] for t in tasks])):>7}")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s["stages"].items())
                 + f"; total {s['total_seconds']:.1f}")
    return "\n".join(lines)


def with_overrides(cfg: ZooConfig, items: list[str]) -> ZooConfig:
    """`cfg` with KEY=VALUE overrides of its scalar fields (the `--set` of the command lines)."""
    fields = {f.name: f for f in dataclasses.fields(cfg) if f.name not in ("tasks", "version")}
    kw = {}
    retired = {name for r in RETIRED_FIELDS.values() for name in r}
    for item in items:
        k, sep, v = item.partition("=")
        if sep and k in retired:
            raise SystemExit(f"--set {item!r}: {k} was removed from the data design; commit 2c6eac4 has it")
        if not sep or k not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = type(getattr(cfg, k))
        try:
            if kind is bool:
                if v.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(v)
                kw[k] = v.lower() in ("true", "1")
            else:
                kw[k] = kind(v)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {k} takes a {kind.__name__}") from None
    out = dataclasses.replace(cfg, **kw)
    out.design  # range check of the data design before any work
    if not 0 <= out.pretrain_group <= len(out.tasks):
        raise SystemExit(f"--set pretrain_group={out.pretrain_group}: must be 0 (all tasks) to {len(out.tasks)}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", choices=DEMO_MODELS)
    p.add_argument("--checkpoint-dir", default="checkpoints", help="zoo goes to <dir>/<model>/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override ZooConfig fields for experiments, e.g. ft_lr=1e-4 (always rebuilds)")
    a = p.parse_args(argv)
    if a.set:
        build_zoo(a.model, a.checkpoint_dir, seed=a.seed, cfg=with_overrides(CONFIGS[a.model], a.set),
                  reuse_pretrain=not a.rebuild)
    else:
        path = ensure_zoo(a.model, a.checkpoint_dir, rebuild=a.rebuild, seed=a.seed)
        print(format_report(json.loads((path / "zoo.json").read_text())))


if __name__ == "__main__":
    main()
