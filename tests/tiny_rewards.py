"""Tiny random-weight reward models of every built-in kind, saved the way their real checkpoints ship."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from world.tokenizers import clip_tokenizer

HPS_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
BERT_WORDS = "a an the of red blue green cat dog photo square circle handwritten digit seven two".split()
TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 16, "image_size": 32}


def save_hps(directory: Path, seed: int = 0) -> dict:
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "tiny-hps.json"
    config.write_text(json.dumps(HPS_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-hps", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, directory / "HPS_tiny_compressed.pt")
    return {"kind": "hpsv2.1", "checkpoint": str(directory / "HPS_tiny_compressed.pt"), "options": {"arch_config": str(config)}}


def build_hf_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    tok = clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    return CLIPModel(config)


def save_hf_clip(directory: Path, model=None, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor

    (model or build_hf_clip(seed)).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    clip_tokenizer().save_pretrained(directory)
    return directory


def save_aesthetic(directory: Path, seed: int = 0) -> dict:
    from rewards.clip_hf import AestheticMLP

    save_hf_clip(directory / "clip", seed=seed)
    torch.manual_seed(seed + 1)
    torch.save(AestheticMLP(16).state_dict(), directory / "aesthetic-mlp.pth")
    return {"kind": "aesthetic", "model": str(directory / "clip"), "checkpoint": str(directory / "aesthetic-mlp.pth")}


def save_image_reward(directory: Path, seed: int = 0) -> dict:
    from transformers import BertConfig, BertTokenizer

    from rewards.image_reward import ImageRewardModel

    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tokenizer.save_pretrained(directory / "bert")
    med = BertConfig(vocab_size=len(tokenizer) + 2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, add_cross_attention=True, layer_norm_eps=1e-12)
    med.to_json_file(str(directory / "med_config.json"))
    torch.manual_seed(seed)
    torch.save(ImageRewardModel(med, TINY_VIT).state_dict(), directory / "ImageReward.pt")
    return {"kind": "imagereward", "checkpoint": str(directory / "ImageReward.pt"), "tokenizer": str(directory / "bert"),
            "options": {"med_config": str(directory / "med_config.json"), "vit": TINY_VIT}}


def reward_specs(directory: Path) -> dict[str, dict]:
    """One spec (without name) of every built-in kind, all saved under `directory`."""
    save_hf_clip(directory / "pick")
    return {
        "hps": save_hps(directory / "hps"),
        "imagereward": save_image_reward(directory / "ir"),
        "pickscore": {"kind": "pickscore", "model": str(directory / "pick")},
        "aesthetic": save_aesthetic(directory / "aes"),
        "clipscore": {"kind": "clipscore", "model": str(directory / "pick")},
    }
