"""Evaluation throughput with and without the preprocessed-input cache (src/input_cache.py).

    python benchmarks/eval_throughput.py                   # 2,000 JPEGs of 500x375, 2 loader workers
    python benchmarks/eval_throughput.py --images 4000 --workers 8 --device cuda

Writes a folder dataset of JPEGs at SUN397-like sizes (smooth random scenes plus grain, about 60 KB each)
once, registers it as task "Bench" whose validation split is that folder, and evaluates it through
``src.eval.evaluate_tasks`` with open_clip's ViT-B/32 evaluation transform (bicubic resize to 224, centre
crop) and a model cheap enough that decoding dominates: an open_clip ViT at 224 px with patch 32, width 64,
one layer (random weights). It reports images/s of
  plain    the loader as before (decode + transform + ToTensor + Normalize in the workers),
  first    the first pass with the cache (decode + resize to uint8, normalise on the device, write the file),
  cached   a later pass (memory-mapped uint8 -> device -> normalise),
then times a 20-point ``--scaling_coef auto`` (TA grid 0.05..1.0: write theta_0 + c * tau into the model,
evaluate the val split), without the cache and with a fresh one, and the peak anonymous memory (RssAnon)
of the cached passes against the size of the cache file, which stays memory-mapped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.datasets import registry  # noqa: E402
from src.eval import evaluate_tasks  # noqa: E402
from src.input_cache import InputCache  # noqa: E402
from src.modeling import ClassificationHead, ImageEncoder  # noqa: E402
from src.tuning import apply_in_place, default_grid, select_coefficient  # noqa: E402

CLASSES = 10


def write_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """n JPEGs in CLASSES class folders; skipped when the folder already holds them."""
    from PIL import Image

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        c = i % CLASSES
        base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        base[..., c % 3] = np.clip(base[..., c % 3].astype(int) + 60, 0, 255)  # a class-dependent tint
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)  # grain, like photos
        path = folder / f"class_{c}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)


def cheap_model(width: int = 64) -> tuple[ImageEncoder, ClassificationHead]:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    clip_model = CLIP(embed_dim=32, quick_gelu=True,
                      vision_cfg=CLIPVisionCfg(layers=1, width=width, head_width=min(32, width), patch_size=32,
                                               image_size=224),
                      text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    return ImageEncoder(clip_model).eval(), ClassificationHead(normalize=True, weights=100 * torch.randn(CLASSES, 32))


class PeakAnon:
    """Peak RssAnon (heap, not file-backed pages) of this process, sampled every 10 ms."""

    def __enter__(self):
        self.peak, self.stop = 0, threading.Event()
        self._sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def _run(self):
        while not self.stop.is_set():
            self._sample()
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", default="500x375", help="WxH of the JPEGs")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (decoding processes)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--width", type=int, default=64, help="width of the one-layer ViT (smaller: cheaper model)")
    p.add_argument("--grid", type=int, default=20, help="points of the --scaling_coef auto grid (TA: 20)")
    p.add_argument("--out", default="benchmarks/results/eval_throughput")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "images"
    t0 = time.perf_counter()
    write_images(data, args.images, tuple(int(v) for v in args.size.split("x")))
    print(f"dataset: {args.images} JPEGs of {args.size} in {data} "
          f"({sum(f.stat().st_size for f in data.rglob('*.jpg')) / args.images / 1e3:.0f} KB each, "
          f"ready in {time.perf_counter() - t0:.1f} s)", flush=True)

    from torchvision.datasets import ImageFolder

    import clip
    registry._load_plugins()
    registry.register_dataset("Bench", lambda split, pre, loc: ImageFolder(loc, transform=pre),
                              [f"class {i}" for i in range(CLASSES)], [lambda c: c], val_from_train=False)
    preprocess = clip.get_preprocess("ViT-B-32")[1]
    encoder, head = cheap_model(args.width)
    heads = {"Bench": head}
    device = torch.device(args.device)

    def evaluate(cache):
        return evaluate_tasks(encoder, ["BenchVal"], heads, preprocess, str(data), device=device,
                              batch_size=args.batch_size, num_workers=args.workers, progress=False, input_cache=cache)

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    # model alone: the same batches already in memory, so the ceiling of any data pipeline
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    encoder.to(device)
    with torch.no_grad():
        head.to(device)(encoder(x))
        _, t_model = timed(lambda: [head(encoder(x)) for _ in range(5)])
    model_ips = 5 * args.batch_size / t_model

    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    plain, t_plain = timed(lambda: evaluate(None))
    cache = InputCache(cache_dir, "auto")
    first, t_first = timed(lambda: evaluate(cache))
    fresh = InputCache(cache_dir, "auto")  # a new run: opens the file, decodes nothing
    with PeakAnon() as mem_plain:
        evaluate(None)
    with PeakAnon() as mem:
        cached, t_cached = timed(lambda: evaluate(fresh))
    assert plain == first == cached, (plain, first, cached)
    cache_bytes = sum(f.stat().st_size for f in cache_dir.rglob("*.npy"))
    n = args.images

    # a --scaling_coef auto sweep: theta_0 + c * tau written into the loaded model, val split evaluated
    params = encoder.state_dict()
    keys = [k for k in params if k.startswith("model.visual.") and params[k].dtype.is_floating_point]
    base = {k: params[k].clone() for k in keys}
    torch.manual_seed(1)
    tau = {k: 0.02 * torch.randn_like(base[k]) for k in keys}
    grid = default_grid("TA")[: args.grid]

    def sweep(cache):
        def score(coef):
            apply_in_place(params, base, tau, coef)
            return evaluate(cache)
        return select_coefficient(grid, score)

    sel_plain, t_sweep_plain = timed(lambda: sweep(None))
    shutil.rmtree(cache_dir, ignore_errors=True)
    sel_cached, t_sweep_cached = timed(lambda: sweep(InputCache(cache_dir, "auto")))
    assert sel_plain.curve == sel_cached.curve
    with torch.no_grad():  # the floor: the same sweep with the batches already on the device
        _, t_sweep_model = timed(lambda: [apply_in_place(params, base, tau, c) or
                                          [head(encoder(x)) for _ in range(-(-n // args.batch_size))] for c in grid])

    result = {
        "images": n, "size": args.size, "workers": args.workers, "batch_size": args.batch_size,
        "device": str(device), "threads": args.threads, "cpus": os.cpu_count(),
        "model": f"open_clip ViT 224 px, patch 32, width {args.width}, 1 layer (random weights)",
        "model_only_images_per_s": round(model_ips, 1),
        "plain_images_per_s": round(n / t_plain, 1), "first_pass_images_per_s": round(n / t_first, 1),
        "cached_images_per_s": round(n / t_cached, 1), "cached_over_first": round(t_first / t_cached, 1),
        "sweep_points": len(grid), "sweep_seconds_no_cache": round(t_sweep_plain, 1),
        "sweep_seconds_cache": round(t_sweep_cached, 1), "sweep_seconds_model_only": round(t_sweep_model, 1),
        "cache_file_mib": round(cache_bytes / 2**20, 1),
        "peak_rss_anon_mib_cached_pass": round(mem.peak / 2**20, 1),
        "peak_rss_anon_mib_plain_pass": round(mem_plain.peak / 2**20, 1),
        "accuracy": plain["BenchVal"],
    }
    print(json.dumps(result, indent=1))
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
