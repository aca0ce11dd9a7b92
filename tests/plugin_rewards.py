"""Plug-in rewards for the tests: plain classes that implement the Reward protocol and nothing else."""

from __future__ import annotations

import numpy as np


class Brightness:
    """Mean pixel value in [0, 1]; logs each call to `options.log` when given."""

    def __init__(self, spec):
        self.name = spec.name
        self.log = spec.options.get("log")
        self.nan_for = spec.options.get("nan_for")

    def to(self, device):
        return self

    def score(self, images, prompts):
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{len(images)}\n")
        out = np.array([np.asarray(im.convert("RGB"), dtype=np.float32).mean() / 255 for im in images])
        out[[p == self.nan_for for p in prompts]] = np.nan
        return out


class NotAReward:
    def __init__(self, spec):
        self.name = spec.name
