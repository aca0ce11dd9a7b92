"""The component configs of five real text-to-image models, as data (written from their public configs).

Parameter counts on the meta device (`python -m benchmarks.memory` prints them next to these) against the
published sizes:

| model | denoiser | VAE | text encoders |
|---|---|---|---|
| SD 1.5 | UNet 859.5 M (published 860 M) | 83.7 M (84 M) | CLIP-L 123.1 M (123 M) |
| SDXL | UNet 2,567.5 M (2.6 B) | 83.7 M | CLIP-L 123.1 M, OpenCLIP bigG 694.7 M (695 M) |
| SD3-medium | MMDiT 2,028.3 M (2 B) | 83.8 M | CLIP-L 123.7 M, CLIP-G 694.7 M, T5-XXL encoder 4,762.3 M (4.7 B) |
| SD3.5-large | MMDiT 8,056.6 M (8.1 B) | 83.8 M | as SD3-medium |
| FLUX.1-dev | 11,901.4 M (12 B) | 83.8 M | CLIP-L 123.1 M, T5-XXL encoder 4,762.3 M |

Tokenizers and schedulers hold no weights and are left out.
"""

from __future__ import annotations

from trainer.memory import Component

CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_BIGG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
             "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "is_encoder_decoder": False}
VAE_4CH = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "layers_per_block": 2, "sample_size": 512, "scaling_factor": 0.18215}
VAE_16CH = {**VAE_4CH, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}

SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
             "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
             "layers_per_block": 2, "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}
SD3_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
              "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
              "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192}
SD35_LARGE = {**SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
              "qk_norm": "rms_norm"}
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}


def _vae(config: dict) -> Component:
    return Component("vae", "diffusers", "AutoencoderKL", config)


def _sd3(transformer: dict) -> list[Component]:
    return [Component("transformer", "diffusers", "SD3Transformer2DModel", transformer), _vae(VAE_16CH),
            Component("text_encoder", "transformers", "CLIPTextModelWithProjection", CLIP_L),
            Component("text_encoder_2", "transformers", "CLIPTextModelWithProjection", CLIP_BIGG),
            Component("text_encoder_3", "transformers", "T5EncoderModel", T5_XXL)]


ARCHITECTURES: dict[str, list[Component]] = {
    "SD 1.5": [Component("unet", "diffusers", "UNet2DConditionModel", SD15_UNET), _vae(VAE_4CH),
               Component("text_encoder", "transformers", "CLIPTextModel", CLIP_L)],
    "SDXL": [Component("unet", "diffusers", "UNet2DConditionModel", SDXL_UNET), _vae({**VAE_4CH, "sample_size": 1024}),
             Component("text_encoder", "transformers", "CLIPTextModel", CLIP_L),
             Component("text_encoder_2", "transformers", "CLIPTextModelWithProjection", CLIP_BIGG)],
    "SD3-medium": _sd3(SD3_MEDIUM),
    "SD3.5-large": _sd3(SD35_LARGE),
    "FLUX.1-dev": [Component("transformer", "diffusers", "FluxTransformer2DModel", FLUX_DEV), _vae(VAE_16CH),
                   Component("text_encoder", "transformers", "CLIPTextModel", CLIP_L),
                   Component("text_encoder_2", "transformers", "T5EncoderModel", T5_XXL)],
}
PUBLISHED_DENOISER = {"SD 1.5": 0.86e9, "SDXL": 2.6e9, "SD3-medium": 2.0e9, "SD3.5-large": 8.1e9, "FLUX.1-dev": 12e9}
NATIVE_RESOLUTION = {"SD 1.5": 512, "SDXL": 1024, "SD3-medium": 1024, "SD3.5-large": 1024, "FLUX.1-dev": 1024}
