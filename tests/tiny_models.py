"""Tiny random-weight pipelines of every supported family, built from configs and saved to a directory.

The tokenizers are real (see world.tokenizers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from world.tokenizers import clip_tokenizer, t5_tokenizer


def _clip_text(hidden: int = 32, projection: int | None = None, layers: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    tok = t5_tokenizer()
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2))


def _vae(latent_channels: int = 4, levels: int = 2, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8] * levels, in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        norm_num_groups=4, layers_per_block=1, **extra,
    )


def build_sd(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=_clip_text(), tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl(prediction_type: str = "epsilon"):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip_text(), text_encoder_2=_clip_text(projection=32), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler(prediction_type=prediction_type),
    )


def build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5),
        text_encoder=_clip_text(projection=32), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text(projection=32), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(32), tokenizer_3=t5_tokenizer(),
    )


def build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4],
    )
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=_clip_text(), tokenizer=clip_tokenizer(), text_encoder_2=_t5(32), tokenizer_2=t5_tokenizer(),
    )


def build_amused():
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel

    transformer = UVit2DModel(
        hidden_size=8, use_bias=False, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
        encoder_hidden_size=8, vocab_size=32, codebook_size=32, in_channels=8, block_out_channels=8,
        num_res_blocks=1, downsample=True, upsample=True, block_num_heads=1, num_hidden_layers=1,
        num_attention_heads=1, intermediate_size=8, layer_norm_eps=1e-6, ln_elementwise_affine=True,
    )
    vqvae = VQModel(
        act_fn="silu", block_out_channels=[8], down_block_types=["DownEncoderBlock2D"], in_channels=3,
        latent_channels=8, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=32, out_channels=3,
        sample_size=8, up_block_types=["UpDecoderBlock2D"], mid_block_add_attention=False, lookup_from_codebook=True,
    )
    return AmusedPipeline(
        vqvae=vqvae, tokenizer=clip_tokenizer(), text_encoder=_clip_text(hidden=8, projection=8),
        transformer=transformer, scheduler=AmusedScheduler(mask_token_id=31),
    )


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux, "amused": build_amused}


def save_tiny(family: str, directory: Path, seed: int = 0) -> Path:
    """Build the tiny `family` pipeline with weights from `seed` and save it as a diffusers pipeline dir."""
    torch.manual_seed(seed)
    pipe = BUILDERS[family]()
    pipe.save_pretrained(directory)
    return Path(directory)
