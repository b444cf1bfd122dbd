"""Hugging Face CLIP folders -> open_clip: same image features within 1e-5 (transformers optional)."""
import json
import shutil

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

import clip
from clip.checkpoint import CheckpointError
from clip.factory import load_into
from clip.hf import hf_to_open_clip, open_clip_to_hf
from src.modeling import ImageEncoder

transformers = pytest.importorskip("transformers", reason="transformers is optional; needed only for the HF test")

VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
              image_size=32, hidden_act="quick_gelu")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=49, pad_token_id=1)


def open_clip_twin(embed_dim: int) -> torch.nn.Module:
    """The open_clip CLIP with the same sizes as the tiny HF model."""
    return open_clip.model.CLIP(
        embed_dim=embed_dim,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=16, mlp_ratio=4, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1),
        quick_gelu=True)


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object


@pytest.fixture(scope="module")
def hf_clip():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=32)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # make the LayerNorms non-trivial so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_clip_model_folder_matches_open_clip(tmp_path, hf_clip):
    hf_clip.save_pretrained(tmp_path / "hf")
    sd = clip.load_state_dict(tmp_path / "hf")
    assert sd.meta["format"] == "huggingface"
    assert sd.info("model.visual.transformer.resblocks.0.attn.in_proj_weight") == (torch.Size([192, 64]), torch.float32)
    assert not any(k.startswith("model.transformer.") for k in sd)
    encoder = ImageEncoder(open_clip_twin(32))
    assert set(sd) == set(encoder.state_dict())
    load_into(encoder, sd)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = _features(hf_clip.get_image_features(pixel_values=x))
        got = encoder(x)
    assert want.shape == got.shape == (3, 32)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert torch.equal(sd["model.logit_scale"], hf_clip.logit_scale.detach())
    # the lazy reader and the eager conversion agree, and the conversion inverts
    eager = hf_to_open_clip(hf_clip.state_dict())
    assert all(torch.equal(sd["model." + k], v) for k, v in eager.items())
    back = open_clip_to_hf(eager)
    hf_sd = hf_clip.state_dict()
    assert back.keys() <= hf_sd.keys() and all(torch.equal(back[k], hf_sd[k]) for k in back)
    # the same folder with pytorch_model.bin instead of safetensors
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "bin")
    torch.save(hf_sd, tmp_path / "bin" / "pytorch_model.bin")
    sd_bin = clip.load_state_dict(tmp_path / "bin")
    assert set(sd_bin) == set(sd) and all(torch.equal(sd_bin[k], sd[k]) for k in sd)


def test_vision_model_folder_matches_open_clip(tmp_path):
    torch.manual_seed(1)
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    hf.save_pretrained(tmp_path / "vision")
    sd = clip.load_state_dict(tmp_path / "vision")
    assert all(k.startswith("model.visual.") for k in sd) and "model.visual.proj" not in sd
    model = open_clip_twin(64)
    with torch.no_grad():
        model.visual.proj.copy_(torch.eye(64))  # CLIPVisionModel's pooled output has no projection
    result = model.load_state_dict({k[len("model."):]: sd[k] for k in sd}, strict=False)
    assert [k for k in result.missing_keys if k.startswith("visual.")] == ["visual.proj"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = hf(pixel_values=x).pooler_output, model.encode_image(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_bad_hf_folders(tmp_path, hf_clip):
    hf_clip.save_pretrained(tmp_path / "gelu")
    (tmp_path / "noweights").mkdir()
    shutil.copy(tmp_path / "gelu" / "config.json", tmp_path / "noweights")
    cfg = json.loads((tmp_path / "gelu" / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "gelu"
    (tmp_path / "gelu" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="QuickGELU"):
        clip.load_state_dict(tmp_path / "gelu")
    with pytest.raises(CheckpointError, match=r"noweights.*model\.safetensors"):
        clip.load_state_dict(tmp_path / "noweights")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        clip.load_state_dict(tmp_path / "empty")


def test_hf_layout_fills_frozen_keys_from_zeroshot(tmp_path, hf_clip):
    """FusionBench fine-tunes are CLIPVisionModel folders: projection and text side come from the zero-shot."""
    from src.task_vectors import TaskVector
    hf_clip.save_pretrained(tmp_path / "clip-vit-base-patch32")
    vision = transformers.CLIPVisionModel(hf_clip.config.vision_config).eval()
    tower = getattr(vision, "vision_model", vision)  # transformers 5 dropped the wrapper
    tower.load_state_dict(hf_clip.vision_model.state_dict())
    with torch.no_grad():
        tower.post_layernorm.bias.add_(0.5)
    vision.save_pretrained(tmp_path / "clip-vit-base-patch32_mnist")
    found = clip.find_checkpoints("ViT-B-32", tmp_path, ["MNIST"])
    assert found.layout == "hf"
    zs, ft = found.load_zeroshot(), found.load_finetuned("MNIST")
    assert list(ft) == list(zs) and "model.visual.proj" in ft.meta["filled_keys"]
    tv = TaskVector(zs, ft)
    assert torch.allclose(tv.vector["model.visual.ln_post.bias"], torch.full((64,), 0.5))
    assert torch.equal(tv.vector["model.visual.proj"], torch.zeros(64, 32))
    found.check()
