"""Tokenizers built without a model hub.

The OpenAI CLIP BPE vocabulary ships inside open_clip, so a real 49,408-token CLIPTokenizer can be built from it
offline. The T5 tokenizer is built from an explicit small vocabulary (enough for prompts of the demo world).
"""

from __future__ import annotations

from functools import cache

T5_WORDS = (
    "a an the of handwritten digit number written by hand neat sloppy bold thin small large photo "
    "zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9 cat dog red blue"
).split()


@cache
def clip_tokenizer(max_length: int = 77):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): i for tok, i in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


@cache
def t5_tokenizer(max_length: int = 512):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁{w}", -float(i)) for i, w in enumerate(T5_WORDS)]
    pieces += [(c, -100.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,."]
    return T5Tokenizer(vocab=pieces, unk_id=2, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                       extra_ids=0, model_max_length=max_length)
