"""Image encoder, classification head and classifier (same meaning as mlfoundations/task_vectors).

Models are built by ``build_image_encoder`` from an architecture of ``clip.factory`` (open_clip's CLIP
names, or one registered there such as the demo models) plus a loaded state dict, never by unpickling a
module.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor, nn

import src.demo.model  # noqa: F401  registers the demo architectures with clip.factory
from clip.factory import create_model, get_preprocess, load_into, load_state_dict


class ImageEncoder(nn.Module):
    """Wraps an open_clip CLIP as ``self.model``; ``forward`` = ``model.encode_image``.

    As in task_vectors, the text transformer is removed unless ``keep_lang``, so
    ``state_dict()`` keys are ``model.<open_clip key>`` without ``model.transformer.*``.
    """

    def __init__(self, model: nn.Module, keep_lang: bool = False, train_preprocess=None, val_preprocess=None):
        super().__init__()
        if not keep_lang and hasattr(model, "transformer"):
            delattr(model, "transformer")
        self.model = model
        self.train_preprocess = train_preprocess
        self.val_preprocess = val_preprocess

    def forward(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)


class ClassificationHead(nn.Linear):
    """Linear head whose rows are class text embeddings times exp(logit_scale), bias 0.

    With ``normalize`` the image features are L2-normalised first (cosine logits).
    """

    def __init__(self, normalize: bool, weights: Tensor, biases: Tensor | None = None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))

    def forward(self, inputs: Tensor) -> Tensor:
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)


class ImageClassifier(nn.Module):
    """``head(image_encoder(x))``."""

    def __init__(self, image_encoder: ImageEncoder, classification_head: ClassificationHead):
        super().__init__()
        self.image_encoder = image_encoder
        self.classification_head = classification_head
        if image_encoder is not None:
            self.train_preprocess = image_encoder.train_preprocess
            self.val_preprocess = image_encoder.val_preprocess

    def freeze_head(self) -> None:
        self.classification_head.weight.requires_grad_(False)
        self.classification_head.bias.requires_grad_(False)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.classification_head(self.image_encoder(inputs))


def build_image_encoder(name: str, state_dict: Mapping[str, Tensor] | str | os.PathLike | None = None
                        ) -> ImageEncoder:
    """``ImageEncoder`` of architecture ``name`` (text transformer dropped), loaded from ``state_dict`` (a
    mapping, or a path read with ``clip.load_state_dict``); random weights when None."""
    train_tf, val_tf = get_preprocess(name)
    encoder = ImageEncoder(create_model(name), keep_lang=False, train_preprocess=train_tf, val_preprocess=val_tf)
    if state_dict is not None:
        if not isinstance(state_dict, Mapping):
            state_dict = load_state_dict(state_dict)
        load_into(encoder, state_dict)
    return encoder
