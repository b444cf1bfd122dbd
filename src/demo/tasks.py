"""Eight generated 32x32 RGB classification tasks for the embedded demo benchmark.

Every image is a deterministic function of (seed, task, split, design): the same call always returns the
same uint8 array. `Design` says how the data are made. The default design puts the miniature in the
regime of real CLIP: pretraining shows every class in images, large and centred, but its captions name
the classes rarely (and some never) and use aliases otherwise, so the image features separate the
classes while the prompts are weak; every downstream image carries a light magenta veil that
pretraining never showed (a part every task must learn the same way), and the Colors hues drift.
Downstream images are otherwise drawn as pretraining draws them. The designs that did not work (a
downstream pixel shift, per-task styles, a frame) are in commit 2c6eac4 (docs/embedded-benchmark.md).
"""
from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
SS = 2  # supersampling factor for anti-aliased masks
SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 2000, "val": 200, "test": 500}


@dataclass(frozen=True)
class Design:
    """How the data of a zoo are made (docs/embedded-benchmark.md says what each field does to the
    benchmark). The defaults are the design of the `demo` and `demo-micro` zoos."""
    name_rate: float = 0.1  # fraction of pretraining captions naming the class (and colour) as the prompts
    # do; the others use an alias (e.g. "kilo" for the letter k), so image features learn the classes
    # while the prompts' words are rarely seen
    tint: float = 0.25  # opacity of a magenta veil over every downstream image, never shown in pretraining:
    # a part every task must learn the same way
    hue_drift: float = 20.0  # degrees by which downstream Colors hues drift towards the next class
    # (white balance of another camera: the hue features are there, the prompts' boundaries are off)
    unnamed: float = 0.25  # fraction of each task's classes (its last ones) whose names no caption ever uses:
    # the prompts know the others' names only (as CLIP knows "cat" but not every car model)
    centred: bool = True  # digits, letters and shapes drawn large at the centre (a patch-8 ViT learns
    # fine shapes at a fixed place from this little data; where things are is the Position task's job)

    def __post_init__(self):
        if not (0 <= self.name_rate <= 1 and 0 <= self.tint <= 1 and 0 <= self.unnamed <= 1):
            raise ValueError(f"demo design out of range: {self} (name_rate, tint, unnamed in [0, 1])")


DEFAULT_DESIGN = Design()


@dataclass(frozen=True)
class DemoTask:
    """One generated task: class names, prompt templates and a per-image renderer."""
    name: str
    classnames: tuple[str, ...]
    templates: tuple[Callable[[str], str], ...]
    captions: tuple[str, ...]  # pretraining caption formats with "{c}" (class) and "{k}" (colour)
    aliases: tuple[str, ...]  # a second name per class, used by captions that do not name the class
    mask: Callable[..., np.ndarray]  # (rng, label, split, centred) -> [32,32] float in [0,1]


# ----------------------------------------------------------------------------- drawing helpers
def _new(ss: int = SS) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("L", (SIZE * ss, SIZE * ss), 0)
    return im, ImageDraw.Draw(im)


def _down(im: Image.Image) -> np.ndarray:
    return np.asarray(im.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255.0


def _regular(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    a = rot + np.arange(n) * 2 * np.pi / n
    return list(zip(cx + r * np.cos(a), cy + r * np.sin(a)))


def _star(cx, cy, r, rot):
    a = rot + np.arange(10) * np.pi / 5
    rr = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return list(zip(cx + rr * np.cos(a), cy + rr * np.sin(a)))


def _shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rot: float) -> None:
    w = max(2, int(r * 0.35))
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=w)
    elif kind == "square":
        d.polygon(_regular(cx, cy, r * 1.2, 4, rot + np.pi / 4), fill=255)
    elif kind == "diamond":
        d.polygon(_regular(cx, cy, r * 1.2, 4, rot * 0.2), fill=255)
    elif kind == "triangle":
        d.polygon(_regular(cx, cy, r * 1.2, 3, rot - np.pi / 2), fill=255)
    elif kind == "hexagon":
        d.polygon(_regular(cx, cy, r * 1.1, 6, rot), fill=255)
    elif kind == "star":
        d.polygon(_star(cx, cy, r * 1.3, rot - np.pi / 2), fill=255)
    elif kind == "cross":
        c, s = np.cos(rot * 0.2), np.sin(rot * 0.2)
        for dx, dy in ((c, s), (-s, c)):
            d.line([cx - r * dx, cy - r * dy, cx + r * dx, cy + r * dy], fill=255, width=w + 1)
    else:
        raise ValueError(kind)


# ----------------------------------------------------------------------------- task masks
@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (its load_digits data), read from the package's own file without
    importing scikit-learn (2 s): images [1797, 8, 8] in [0, 1], labels [1797]."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")  # locates the package, runs none of it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the demo's Digits task needs scikit-learn's bundled digits: pip install scikit-learn")
    data = np.loadtxt(os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz"),
                      delimiter=",")
    return (data[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32), data[:, -1].astype(np.int64)


def _digit_mask(rng, label, split, centred=False):
    imgs, target = _digits()
    # disjoint source images per split: train 3/5, val 1/5, test 1/5 (by index modulo 5)
    part = {"train": (0, 1, 2), "val": (3,), "test": (4,), "pretrain": (0, 1, 2)}[split]
    idx = np.flatnonzero((target == label) & np.isin(np.arange(len(target)) % 5, part))
    src = Image.fromarray((imgs[rng.choice(idx)] * 255).astype(np.uint8))
    s = int(rng.integers(26, 31) if centred else rng.integers(22, 31)) * SS
    im, _ = _new()
    o = ((SIZE * SS - s) // 2 + rng.integers(-SS, SS + 1, size=2) if centred
         else rng.integers(0, SIZE * SS - s + 1, size=2))
    im.paste(src.resize((s, s), Image.BICUBIC), (int(o[0]), int(o[1])))
    return _down(im)


@functools.lru_cache(maxsize=8)
def _font(size: int):
    return ImageFont.load_default(size=size)  # Pillow's bundled font: offline


LETTERS = tuple("abcdefhkmr")


def _letter_mask(rng, label, split, centred=False):
    im, d = _new()
    size = int(rng.integers(50, 58) if centred else rng.integers(40, 54))
    upper = rng.random() < 0.5
    ch = LETTERS[label].upper() if upper else LETTERS[label]
    c = SIZE * SS / 2 + rng.uniform(*((-2, 2) if centred else (-8, 8)), size=2)
    d.text((c[0], c[1]), ch, font=_font(size), fill=255, anchor="mm")
    return _down(im)


SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")


def _shape_mask(rng, label, split, centred=False):
    im, d = _new()
    r = rng.uniform(11, 13) * SS if centred else rng.uniform(9, 13) * SS
    c = (SIZE * SS / 2 + rng.uniform(-2, 2, size=2) * SS if centred
         else rng.uniform(r + 2, SIZE * SS - r - 2, size=2))
    _shape(d, SHAPES[label], c[0], c[1], r, rng.uniform(-0.3, 0.3))
    return _down(im)


TEXTURES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots", "grid")


def _texture_mask(rng, label, split, centred=False):
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    p = rng.uniform(5, 8)
    ph = rng.uniform(0, p, size=2)
    sq = lambda v: (np.sin(2 * np.pi * v / p) > 0).astype(np.float32)
    name = TEXTURES[label]
    if name == "horizontal stripes":
        m = sq(y + ph[0])
    elif name == "vertical stripes":
        m = sq(x + ph[0])
    elif name == "diagonal stripes":
        m = sq((x + y) / np.sqrt(2) + ph[0]) if rng.random() < 0.5 else sq((x - y) / np.sqrt(2) + ph[0])
    elif name == "checkerboard":
        m = np.logical_xor(sq(x + ph[0]), sq(y + ph[1])).astype(np.float32)
    elif name == "dots":
        m = ((np.cos(2 * np.pi * (x + ph[0]) / p) + np.cos(2 * np.pi * (y + ph[1]) / p)) > 1.2).astype(np.float32)
    else:  # grid
        m = np.maximum((np.cos(2 * np.pi * (x + ph[0]) / p) > 0.8), (np.cos(2 * np.pi * (y + ph[1]) / p) > 0.8))
        m = m.astype(np.float32)
    return m


COUNTS = ("one", "two", "three", "four", "five", "six")


def _count_mask(rng, label, split, centred=False):
    im, d = _new()
    r = rng.uniform(2.5, 3.5) * SS
    pts: list[np.ndarray] = []
    while len(pts) < label + 1:  # rejection sampling of non-overlapping dots
        p = rng.uniform(r + 1, SIZE * SS - r - 1, size=2)
        if all(np.hypot(*(p - q)) > 2 * r + 2 * SS for q in pts):
            pts.append(p)
    for p in pts:
        d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=255)
    return _down(im)


POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def _position_mask(rng, label, split, centred=False):
    im, d = _new()
    r = rng.uniform(3.5, 4.5) * SS
    cell = SIZE * SS / 3
    j = rng.uniform(-1.5, 1.5, size=2) * SS
    cx, cy = (label % 3 + 0.5) * cell + j[0], (label // 3 + 0.5) * cell + j[1]
    _shape(d, SHAPES[int(rng.integers(0, 3))], cx, cy, r, 0.0)
    return _down(im)


ARROWS = ("right", "down right", "down", "down left", "left", "up left", "up", "up right")


def _arrow_mask(rng, label, split, centred=False):
    im, d = _new()
    L = rng.uniform(10, 13) * SS
    a = label * np.pi / 4 + rng.uniform(-0.15, 0.15)
    c = SIZE * SS / 2 + rng.uniform(-4, 4, size=2) * SS
    u = np.array([np.cos(a), np.sin(a)])
    v = np.array([-u[1], u[0]])
    tail, tip = c - u * L, c + u * L
    w = max(2, int(L * 0.22))
    d.line([*tail, *(tip - u * L * 0.4)], fill=255, width=w)
    head = [tip, tip - u * L * 0.6 + v * L * 0.45, tip - u * L * 0.6 - v * L * 0.45]
    d.polygon([tuple(p) for p in head], fill=255)
    return _down(im)


COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_HUES = (0.0, 30.0, 58.0, 120.0, 180.0, 225.0, 275.0, 320.0)


def _color_mask(rng, label, split, centred=False):
    im, d = _new()
    r = rng.uniform(8, 12) * SS
    c = rng.uniform(r + 2, SIZE * SS - r - 2, size=2)
    _shape(d, SHAPES[int(rng.integers(0, 4))], c[0], c[1], r, rng.uniform(-0.3, 0.3))
    return _down(im)


# ----------------------------------------------------------------------------- composition
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h / 360.0) % 1.0, s, v), dtype=np.float32)


COLOR_ALIASES = ("scarlet", "tangerine", "lemon", "lime", "aqua", "navy", "violet", "rose")


VEIL_COLOUR = np.array([1.0, 0.0, 1.0], dtype=np.float32)  # magenta, never drawn in pretraining


def _colours(rng, task: str, label: int, design: Design = DEFAULT_DESIGN, downstream: bool = True
             ) -> tuple[np.ndarray, np.ndarray, str]:
    """Foreground colour, background colour and the colour word of the foreground."""
    if task == "Colors":
        h = _HUES[label] + rng.uniform(-8, 8)
        # downstream: a systematic hue drift towards the next class (white balance of another camera)
        h += design.hue_drift if downstream else 0.0
        fg = _hsv(h, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
        word = COLORS[label]
    else:
        k = int(rng.integers(0, len(COLORS)))
        fg = _hsv(_HUES[k] + rng.uniform(-8, 8), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
        word = COLORS[k]
    g = rng.uniform(0.0, 0.3)
    bg = np.full(3, g, dtype=np.float32) + rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
    return fg, bg, word


def _compose(rng, task: str, mask: np.ndarray, label: int, design: Design = DEFAULT_DESIGN,
             downstream: bool = True) -> tuple[np.ndarray, str]:
    fg, bg, word = _colours(rng, task, label, design, downstream)
    # the angle of a background gradient that only the shifted designs of commit 2c6eac4 showed: still drawn,
    # and the background still mixed in float64, so that every seed's data stay bit for bit as they were
    rng.uniform(0, 2 * np.pi)
    m = mask[..., None]
    img = bg.astype(np.float64) * (1 - m) + fg * m
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), word


def _tpl(*formats: str) -> tuple[Callable[[str], str], ...]:
    return tuple((lambda c, f=f: f.format(c=c)) for f in formats)


TASKS: dict[str, DemoTask] = {t.name: t for t in (
    DemoTask("Digits", ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
             _tpl("a photo of the number {c}.", "a blurry photo of the digit {c}.", "the handwritten digit {c}."),
             ("a drawing of the digit {c}", "the number {c} written in {k}", "a {k} handwritten {c}",
              "digit {c}"), ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"), _digit_mask),
    DemoTask("Letters", LETTERS,
             _tpl("a photo of the letter {c}.", "the letter {c} in a noisy picture.", "a printed letter {c}."),
             ("the letter {c}", "a {k} letter {c}", "letter {c} printed in {k}", "a drawing of the letter {c}"),
             ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "hotel", "kilo", "mike", "romeo"),
             _letter_mask),
    DemoTask("Shapes", SHAPES,
             _tpl("a photo of a {c}.", "a small {c}.", "a picture of a {c} shape."),
             ("a {k} {c}", "a drawing of a {c}", "a {c} shape in {k}", "a picture of a {c}"),
             ("ball", "box", "wedge", "spiky", "plus", "rhombus", "honeycomb", "loop"), _shape_mask),
    DemoTask("Textures", TEXTURES,
             _tpl("a photo of a {c} texture.", "a {c} pattern.", "a close up photo of {c}."),
             ("a {k} {c} texture", "{c}", "a pattern of {k} {c}", "a {c} pattern"),
             ("rows", "columns", "slants", "chess", "polka", "mesh"), _texture_mask),
    DemoTask("Count", COUNTS,
             _tpl("a photo of {c} dots.", "there are {c} dots.", "a picture with {c} spots."),
             ("{c} dots", "{c} {k} dots", "a picture of {c} dots", "there are {c} {k} dots"),
             ("1", "2", "3", "4", "5", "6"), _count_mask),
    DemoTask("Position", POSITIONS,
             _tpl("a photo of an object in the {c}.", "a small object at the {c}.", "something in the {c}."),
             ("an object in the {c}", "a {k} object at the {c}", "a shape in the {c}", "a {k} blob in the {c}"),
             ("north west", "north", "north east", "west", "middle", "east", "south west", "south", "south east"),
             _position_mask),
    DemoTask("Colors", COLORS,
             _tpl("a photo of a {c} object.", "something {c}.", "the colour {c}."),
             ("a {c} shape", "a {c} object", "something {c}", "a picture of a {c} blob"), COLOR_ALIASES, _color_mask),
    DemoTask("Arrows", ARROWS,
             _tpl("a photo of an arrow pointing {c}.", "a sign with an arrow to the {c}.", "an arrow going {c}."),
             ("an arrow pointing {c}", "a {k} arrow pointing {c}", "an arrow going {c}", "a {k} arrow {c}"),
             ("east", "south east", "south", "south west", "west", "north west", "north", "north east"), _arrow_mask),
)}
TASK_NAMES = tuple(TASKS)


def _rng(seed: int, task: str, split: str) -> np.random.Generator:
    # stable per-(seed, task, split) streams, independent of generation order
    return np.random.default_rng([seed, TASK_NAMES.index(task), (*SPLITS, "pretrain").index(split)])


def render(task: str, label: int, rng: np.random.Generator, split: str,
           design: Design = DEFAULT_DESIGN) -> tuple[np.ndarray, str]:
    """One image (uint8 [32, 32, 3]) of class `label` and the colour word of its foreground. Downstream
    splits ("train", "val", "test") get the design's veil and Colors hue drift; "pretrain" gets neither."""
    spec = TASKS[task]
    downstream = split != "pretrain"
    img, word = _compose(rng, task, spec.mask(rng, label, split, design.centred), label, design, downstream)
    if downstream and design.tint > 0:
        f = np.float32(design.tint)
        img = (img * (1 - f) + VEIL_COLOUR * 255 * f).round().astype(np.uint8)
    return img, word


@functools.lru_cache(maxsize=64)
def generate(task: str, split: str, seed: int = 0, n: int | None = None,
             design: Design = DEFAULT_DESIGN) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (images uint8 [N, 32, 32, 3], labels int64 [N]) for a downstream split.

    Classes are balanced (label = index mod C, then a seeded shuffle). Results are cached in memory;
    treat them as read-only.
    """
    if task not in TASKS:
        raise KeyError(f"unknown demo task {task!r}; known: {', '.join(TASK_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = SPLIT_SIZES[split] if n is None else n
    rng = _rng(seed, task, split)
    C = len(TASKS[task].classnames)
    labels = rng.permutation(np.arange(n) % C)
    imgs = np.stack([render(task, int(y), rng, split, design)[0] for y in labels])
    imgs.setflags(write=False)
    labels.setflags(write=False)
    return imgs, labels.astype(np.int64)


def _nameable(n_classes: int, label: int, design: Design) -> bool:
    """Whether captions may name class `label` (the last round(unnamed * n) classes are never named)."""
    return label < n_classes - round(design.unnamed * n_classes)


def pretrain_data(tasks: tuple[str, ...], n_per_task: int, seed: int = 0,
                  design: Design = DEFAULT_DESIGN) -> tuple[np.ndarray, list[str]]:
    """Clean captioned images for contrastive pretraining: (uint8 [N, 32, 32, 3], captions). A caption
    names the class and colour with the prompts' words with probability design.name_rate, else by alias."""
    imgs, caps = [], []
    for task in tasks:
        spec = TASKS[task]
        rng = _rng(seed, task, "pretrain")
        C = len(spec.classnames)
        for i in range(n_per_task):
            y = i % C
            img, word = render(task, y, rng, "pretrain", design)
            fmt = spec.captions[int(rng.integers(0, len(spec.captions)))]
            named = design.name_rate >= 1 or rng.random() < design.name_rate  # no draw: old streams kept
            c = spec.classnames[y] if named and _nameable(C, y, design) else spec.aliases[y]
            k = word if named and _nameable(len(COLORS), COLORS.index(word), design) else \
                COLOR_ALIASES[COLORS.index(word)]
            imgs.append(img)
            caps.append(fmt.format(c=c, k=k))
    return np.stack(imgs), caps


def corpus() -> list[str]:
    """Every text a demo model can see: prompts, and captions naming classes and colours by their names
    or by their aliases (name_rate < 1). It defines the vocabulary."""
    out = []
    for spec in TASKS.values():
        for c in spec.classnames:
            out += [t(c) for t in spec.templates]
            out += [f.format(c=c, k=k) for f in spec.captions for k in COLORS]
        out += [f.format(c=c, k=k) for c in spec.aliases for f in spec.captions for k in COLOR_ALIASES]
    return out
