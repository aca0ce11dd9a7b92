"""Reward bank: real loading code on tiny saved models, preprocessing by hand, invariance, ordering, plug-ins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import RewardSpec
from pipeline.errors import StageError
from rewards.bank import RewardBank
from rewards.base import build_reward
from rewards.preprocess import OPENAI_MEAN, OPENAI_STD, letterbox, resize_center_crop

KINDS = ["hps", "imagereward", "pickscore", "aesthetic", "clipscore"]


def images(n: int, seed: int = 0, size=(20, 12)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red cat", "a blue dog", "a photo of a square", "the green circle", "a handwritten seven"]


@pytest.mark.parametrize("kind", KINDS)
def test_reward_is_deterministic_and_batch_size_invariant(tiny_rewards, kind):
    bank = RewardBank([RewardSpec(name=kind, **tiny_rewards[kind])])
    ims = images(5)
    whole = bank.score_batches(lambda: [(ims, PROMPTS)])[kind]
    again = RewardBank([RewardSpec(name=kind, **tiny_rewards[kind])]).score_batches(lambda: [(ims, PROMPTS)])[kind]
    split = bank.score_batches(lambda: [(ims[:1], PROMPTS[:1]), (ims[1:3], PROMPTS[1:3]), (ims[3:], PROMPTS[3:])])[kind]
    assert whole.shape == (5,) and np.isfinite(whole).all() and whole.dtype == np.float32
    assert np.array_equal(whole, again)
    assert np.allclose(whole, split, rtol=1e-5, atol=1e-6)
    assert len(set(whole.round(6))) > 1  # depends on the input


@pytest.mark.parametrize("kind", ["hps", "imagereward", "aesthetic"])
def test_checkpoint_with_wrong_keys_is_refused(tiny_rewards, kind, tmp_path):
    from rewards.base import load_state_dict

    spec = dict(tiny_rewards[kind])
    state = load_state_dict(__import__("pathlib").Path(spec["checkpoint"]))
    state["unexpected.weight"] = torch.zeros(1)
    state.pop(next(k for k in state if k.endswith("weight") and k != "unexpected.weight"))
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(StageError, match=r"bad.pt: checkpoint does not match the model: missing keys \['.+'\], unexpected keys \['unexpected.weight'\]"):
        build_reward(RewardSpec(name="r", **{**spec, "checkpoint": str(bad)}))


def test_unsafe_checkpoint_is_refused(tiny_rewards, tmp_path):
    from pathlib import Path

    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Path("/")}, bad)  # weights_only must refuse objects
    with pytest.raises(StageError, match="evil.pt: cannot load checkpoint safely"):
        build_reward(RewardSpec(name="r", **{**tiny_rewards["hps"], "checkpoint": str(bad)}))


def test_hps_letterbox_by_hand():
    red = Image.new("RGB", (8, 4), (255, 0, 0))  # wide: resized to 4x2, then a row of zero padding above and below
    out = letterbox([red], size=4)[0]
    mean, std = torch.tensor(OPENAI_MEAN)[:, None], torch.tensor(OPENAI_STD)[:, None]
    pad = ((0 - mean) / std).expand(3, 4)
    body = ((torch.tensor([1.0, 0, 0])[:, None] - mean) / std).expand(3, 4)
    assert out.shape == (3, 4, 4)
    assert torch.allclose(out[:, 0], pad) and torch.allclose(out[:, 3], pad)
    assert torch.allclose(out[:, 1], body, atol=1e-6) and torch.allclose(out[:, 2], body, atol=1e-6)


def test_center_crop_by_hand():
    im = np.zeros((4, 6, 3), np.uint8)
    im[:, :3] = (0, 0, 255)  # left half blue, right half black; shortest side already 4
    out = resize_center_crop([Image.fromarray(im)], size=4)[0]
    blue = (torch.tensor([0, 0, 1.0]) - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    black = (0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert torch.allclose(out[:, :, 0], blue[:, None].expand(3, 4)) and torch.allclose(out[:, :, 1], blue[:, None].expand(3, 4))
    assert torch.allclose(out[:, :, 2], black[:, None].expand(3, 4)) and torch.allclose(out[:, :, 3], black[:, None].expand(3, 4))


def test_fitted_model_scores_the_matching_prompt_higher(tmp_path):
    """A tiny CLIP fitted to two image-text pairs: each image scores above with its own prompt."""
    from world.tokenizers import clip_tokenizer
    from tests.tiny_rewards import build_hf_clip, save_hf_clip
    from transformers import CLIPImageProcessor

    model = build_hf_clip(seed=1)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pics = [Image.new("RGB", (32, 32), (250, 10, 10)), Image.new("RGB", (32, 32), (10, 10, 250))]
    texts = ["a red square", "a blue circle"]
    pixels = proc(images=pics, return_tensors="pt")["pixel_values"]
    tokens = clip_tokenizer()(texts, padding=True, return_tensors="pt")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        logits = model(pixel_values=pixels, **tokens).logits_per_image
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_hf_clip(tmp_path / "fitted", model)
    for kind in ("clipscore", "pickscore"):
        bank = RewardBank([RewardSpec(name=kind, kind=kind, model=str(tmp_path / "fitted"))])
        s = bank.score_batches(lambda: [(pics + pics, texts + texts[::-1])])[kind]
        assert s[0] > s[2] and s[1] > s[3], (kind, s)  # matched > mismatched, for both images


def test_plugins_and_shared_preprocessing(tiny_rewards, monkeypatch):
    specs = [
        RewardSpec(name="bright", kind="tests.plugin_rewards:Brightness"),
        RewardSpec(name="pick", **tiny_rewards["pickscore"]),
        RewardSpec(name="clip", **tiny_rewards["clipscore"]),
    ]
    bank = RewardBank(specs)
    calls = []
    for reward in bank.loaded.values():
        if hasattr(reward, "preprocess"):
            original = reward.preprocess
            monkeypatch.setattr(reward, "preprocess", lambda ims, f=original: calls.append(len(ims)) or f(ims))
    white = [Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8), (0, 0, 0))]
    out = bank.score_batches(lambda: [(white, PROMPTS[:2])])
    assert np.allclose(out["bright"], [1.0, 0.0])
    assert calls == [2]  # pick and clip share one processor: the batch is preprocessed once


def test_bad_kinds_are_clear_errors():
    with pytest.raises(StageError, match="unknown kind 'hpsv9'; built-in kinds: hpsv2, hpsv2.1, imagereward"):
        build_reward(RewardSpec(name="x", kind="hpsv9"))
    with pytest.raises(StageError, match="cannot import plug-in 'no_such_module:R'"):
        build_reward(RewardSpec(name="x", kind="no_such_module:R"))
    with pytest.raises(StageError, match="tests.plugin_rewards:NotAReward does not implement the Reward protocol"):
        build_reward(RewardSpec(name="x", kind="tests.plugin_rewards:NotAReward"))
    with pytest.raises(StageError, match="HPS needs `checkpoint`"):
        build_reward(RewardSpec(name="x", kind="hpsv2"))


def test_pickscore_matches_the_reference_computation(tiny_rewards):
    """PickScore's reference: processor -> CLIPModel(...).logits_per_image, the diagonal for matched pairs."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    ref_dir = tiny_rewards["pickscore"]["model"]
    model = CLIPModel.from_pretrained(ref_dir).eval()
    proc = AutoImageProcessor.from_pretrained(ref_dir, backend="pil")
    tok = AutoTokenizer.from_pretrained(ref_dir)
    ims, prompts = images(3, seed=4), PROMPTS[:3]
    with torch.no_grad():
        logits = model(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"],
                       **tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")).logits_per_image
    ours = RewardBank([RewardSpec(name="p", **tiny_rewards["pickscore"])]).score_batches(lambda: [(ims, prompts)])["p"]
    assert np.allclose(ours, logits.diagonal().numpy(), rtol=1e-5, atol=1e-5)


def test_hps_matches_open_clip_reference_path(tiny_rewards):
    """HPS's reference path: open_clip's own eval transform (longest side + pad) and the model's forward."""
    import open_clip

    spec = tiny_rewards["hps"]
    open_clip.add_model_config(spec["options"]["arch_config"])
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-hps", pretrained=spec["checkpoint"],
                                                                  image_resize_mode="longest")
    ims, prompts = images(3, seed=5, size=(40, 24)), PROMPTS[:3]
    with torch.no_grad():
        out = model(torch.stack([preprocess(im) for im in ims]), open_clip.get_tokenizer("tiny-hps")(prompts))
        ref = (out[0] * out[1]).sum(-1).numpy()
    ours = RewardBank([RewardSpec(name="h", **spec)]).score_batches(lambda: [(ims, prompts)])["h"]
    assert np.allclose(ours, ref, atol=1e-4)


def png_batches(n: int, seed: int, size: int) -> list[tuple[list[Image.Image], list[str]]]:
    """Lazily opened PNGs (as the score stage reads them), so the decode itself runs on the bank's threads."""
    import io

    def opened(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return Image.open(io.BytesIO(buf.getvalue()))

    ims, prompts = [opened(im) for im in images(n, seed)], (PROMPTS * n)[:n]
    return [(ims[lo : lo + size], prompts[lo : lo + size]) for lo in range(0, n, size)]


def test_decode_threads_and_prefetch_leave_scores_bit_identical(tiny_rewards):
    specs = [RewardSpec(name=k, **tiny_rewards[k]) for k in KINDS] + [RewardSpec(name="bright", kind="tests.plugin_rewards:Brightness")]
    one = RewardBank(specs).score_batches(lambda: png_batches(10, 3, 4))
    threaded = RewardBank(specs, threads=3).score_batches(lambda: png_batches(10, 3, 4))
    one_at_a_time = RewardBank(specs, one_at_a_time=True, threads=2).score_batches(lambda: png_batches(10, 3, 4))
    for name in one:
        assert one[name].shape == (10,)
        assert np.array_equal(one[name], threaded[name]), name
        assert np.array_equal(one[name], one_at_a_time[name]), name


# How far a reduced-precision or other-device score may move from the fp32 CPU score, as a fraction of the
# largest |score| of the batch. bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through a tiny
# random-weight CLIP/BLIP stack the deviation measured on CPU reached 1.8% (HPS), so the bound is 5%. fp32 on
# CUDA differs from CPU by summation order, and by TF32 in cuDNN convolutions (torch's default, 10-bit
# mantissa, relative step 1e-3): bound 0.5%.
BF16_BOUND = 0.05
CUDA_FP32_BOUND = 5e-3


def test_dtype_auto_is_fp32_on_cpu_and_bf16_stays_within_its_bound(tiny_rewards):
    from rewards.bank import resolve_dtype

    assert resolve_dtype("auto", "cpu") == "fp32" and resolve_dtype("auto", "cuda") == "bf16"
    spec = [RewardSpec(name="hps", **tiny_rewards["hps"])]
    auto = RewardBank(spec)
    assert auto.dtype == "fp32"
    ref = auto.score_batches(lambda: png_batches(8, 4, 8))["hps"]
    bf16 = RewardBank(spec, dtype="bf16").score_batches(lambda: png_batches(8, 4, 8))["hps"]
    deviation = np.abs(bf16 - ref).max()
    assert 0 < deviation <= BF16_BOUND * np.abs(ref).max()  # bf16 autocast did run, within its bound


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_scores_at_fp32_and_bf16_stay_within_their_bounds(tiny_rewards, kind):
    spec = [RewardSpec(name=kind, **tiny_rewards[kind])]
    ref = RewardBank(spec, "cpu", dtype="fp32").score_batches(lambda: png_batches(16, 6, 8))[kind]
    fp32 = RewardBank(spec, "cuda", dtype="fp32", threads=4).score_batches(lambda: png_batches(16, 6, 8))[kind]
    auto = RewardBank(spec, "cuda", threads=4)
    assert auto.dtype == "bf16"
    bf16 = auto.score_batches(lambda: png_batches(16, 6, 8))[kind]
    scale = np.abs(ref).max()
    assert np.abs(fp32 - ref).max() <= CUDA_FP32_BOUND * scale
    assert np.abs(bf16 - ref).max() <= BF16_BOUND * scale
