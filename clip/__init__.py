"""Checkpoints and models: one safe, lazy reader for every CLIP checkpoint format.

``load_state_dict(path)`` returns a read-only mapping in the ``model.<open_clip key>`` convention
(text transformer removed) whose tensors are read from disk on access.

Modules, each importing only those before it: ``lazy_unpickle`` (the allow-listed unpickler),
``checkpoint`` (files, StateDict, heads), ``hf`` (Hugging Face folders), ``factory`` (models and
``load_state_dict``), ``layout`` and ``save``.
"""
from clip.checkpoint import (CheckpointError, StateDict, WHERE_CHECKPOINTS_COME_FROM, check_compatible, load_head,
                             save_head, warn_if_identical)
from clip.factory import (CLIP_MODELS, build_image_encoder, check_architecture, create_model, get_preprocess,
                          get_tokenizer, load_state_dict)
from clip.layout import CheckpointSet, find_checkpoints
from clip.save import save_merged, sha256_of

__all__ = [
    "CheckpointError", "StateDict", "WHERE_CHECKPOINTS_COME_FROM", "check_architecture", "check_compatible",
    "load_head", "load_state_dict", "save_head", "warn_if_identical", "CLIP_MODELS", "build_image_encoder",
    "create_model", "get_preprocess", "get_tokenizer", "CheckpointSet", "find_checkpoints", "save_merged",
    "sha256_of",
]
