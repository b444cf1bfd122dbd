"""Small CLIP models for the embedded offline benchmark (`demo`) and for tests (`demo-micro`).

Both are real `open_clip.model.CLIP` instances with small vision/text configurations, so every layer of
the pipeline (state-dict keys, task vectors, SVC on 2-D matrices, heads) runs unchanged on them.
The tokenizer is open_clip's bundled BPE (no download) with its ids remapped, order-preserving, onto the
compact vocabulary of the demo texts (src/demo/tasks.py); end-of-text therefore stays the largest id,
which open_clip's argmax text pooling relies on.

Importing this module registers both names with `clip.factory` (`register_architecture`), so
`clip.create_model`, `clip.get_preprocess`, `clip.get_tokenizer` and the checkpoint checks know them;
src/modeling.py imports it, so every user of the model wrappers has them.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer

from clip.factory import Architecture, register_architecture
from src.demo.tasks import corpus

DEMO_MODELS = ("demo", "demo-micro")
CONTEXT_LENGTH = 16
IMAGE_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
PAD_ID, UNK_ID = 0, 1

# name -> (embed_dim, vision cfg, text cfg without vocab_size)
_CONFIGS = {
    "demo": (64, dict(layers=4, width=128, head_width=32, patch_size=8, image_size=IMAGE_SIZE),
             dict(context_length=CONTEXT_LENGTH, width=64, heads=2, layers=2)),
    "demo-micro": (16, dict(layers=1, width=32, head_width=16, patch_size=8, image_size=IMAGE_SIZE),
                   dict(context_length=CONTEXT_LENGTH, width=32, heads=2, layers=1)),
}


def _check(name: str) -> None:
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_MODELS)}")


class DemoTokenizer:
    """open_clip SimpleTokenizer with ids remapped onto a compact, order-preserving vocabulary.

    Compact ids: 0 = padding, 1 = unknown word piece, then every BPE id used by the demo texts in
    increasing order, so start-of-text and end-of-text (the two largest BPE ids) stay the largest.
    """

    def __init__(self, texts: list[str], context_length: int = CONTEXT_LENGTH):
        self.bpe = SimpleTokenizer()
        self.context_length = context_length
        used = {i for t in texts for i in self.bpe.encode(t)}
        used |= {self.bpe.sot_token_id, self.bpe.eot_token_id}
        ids = sorted(used)
        self.lut = np.full(len(self.bpe.encoder), UNK_ID, dtype=np.int64)
        self.lut[ids] = np.arange(2, len(ids) + 2)
        self.vocab_size = len(ids) + 2
        self.eot_token_id = int(self.lut[self.bpe.eot_token_id])

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.full((len(texts), n), PAD_ID, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.bpe.sot_token_id, *self.bpe.encode(t)][: n - 1] + [self.bpe.eot_token_id]
            out[i, : len(ids)] = torch.from_numpy(self.lut[ids])
        return out


@functools.lru_cache(maxsize=1)
def _tokenizer() -> DemoTokenizer:
    return DemoTokenizer(corpus())  # the vocabulary is that of the demo texts


def get_demo_tokenizer(name: str) -> DemoTokenizer:
    """Tokenizer of a demo model: callable(str | list[str]) -> LongTensor [N, 16]."""
    _check(name)
    return _tokenizer()


def create_demo_model(name: str) -> CLIP:
    """A randomly initialised open_clip CLIP of the named demo size (weights come from the zoo)."""
    _check(name)
    embed_dim, vis, txt = _CONFIGS[name]
    return CLIP(embed_dim, CLIPVisionCfg(**vis), CLIPTextCfg(vocab_size=get_demo_tokenizer(name).vocab_size, **txt))


class ToInput:
    """uint8 HWC image (PIL or array) -> normalised float CHW tensor; batched arrays work too."""

    def __call__(self, img) -> torch.Tensor:
        return to_input(np.asarray(img))


class TrainTransform(ToInput):
    """Random translation by up to 2 pixels (edge padding), then ToInput."""

    def __init__(self, pad: int = 2):
        self.pad = pad

    def __call__(self, img) -> torch.Tensor:
        a = np.pad(np.asarray(img), ((self.pad, self.pad), (self.pad, self.pad), (0, 0)), mode="edge")
        dy, dx = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
        return to_input(a[dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE])


def to_input(a: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] normalised with the demo mean/std."""
    if a.dtype != np.uint8 or a.shape[-3:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"demo models take uint8 {IMAGE_SIZE}x{IMAGE_SIZE} RGB images, got {a.dtype} {a.shape}")
    x = torch.from_numpy(a.astype(np.float32)).div_(255.0)  # astype copies: inputs may be read-only
    x = x.movedim(-1, -3)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


def get_demo_preprocess(name: str) -> tuple[Callable, Callable]:
    """(train_tf, val_tf) for 32x32 RGB images; val_tf is deterministic."""
    _check(name)
    return TrainTransform(), ToInput()


def _register(name: str) -> None:
    # the functions are looked up when called, so a test may patch them on this module
    register_architecture(name, Architecture(
        create=lambda: create_demo_model(name), preprocess=lambda: get_demo_preprocess(name),
        tokenizer=lambda: get_demo_tokenizer(name),
        no_pretrained="it has no pretrained weights: its heads come with the demo zoo (src.demo.zoo.ensure_zoo "
                      "writes them next to its checkpoints)"))


for _name in DEMO_MODELS:
    _register(_name)
