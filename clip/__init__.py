"""Checkpoints and models: one safe, lazy reader for every CLIP checkpoint format.

``load_state_dict(path)`` returns a read-only mapping in the ``model.<open_clip key>`` convention
(text transformer removed) whose tensors are read from disk on access.

Modules, each importing only those before it (and ``utils``, never ``src``): ``lazy_unpickle`` (the
allow-listed unpickler), ``checkpoint`` (files, StateDict, head files as plain data), ``hf`` (Hugging Face
folders), ``factory`` (models, the registry of extra architectures, ``load_state_dict``), ``layout``,
``save`` and ``hub``. The model wrappers (``ImageEncoder``, ``build_image_encoder``) and the head modules
live in ``src.modeling`` and ``src.heads``.
"""
from clip.checkpoint import (CheckpointError, HeadData, StateDict, WHERE_CHECKPOINTS_COME_FROM, check_compatible,
                             read_head, warn_if_identical, write_head)
from clip.factory import (CLIP_MODELS, Architecture, check_architecture, create_model, get_preprocess, get_tokenizer,
                          load_into, load_state_dict, register_architecture)
from clip.layout import CheckpointSet, find_checkpoints
from clip.save import save_merged, sha256_of

__all__ = [
    "CheckpointError", "HeadData", "StateDict", "WHERE_CHECKPOINTS_COME_FROM", "check_architecture",
    "check_compatible", "read_head", "load_state_dict", "write_head", "warn_if_identical", "CLIP_MODELS",
    "Architecture", "create_model", "get_preprocess", "get_tokenizer", "load_into", "register_architecture",
    "CheckpointSet", "find_checkpoints", "save_merged", "sha256_of",
]
