"""The tests' handle on the Hugging Face zoo, which lives in the package (:mod:`fxqat.models.hf_zoo`)."""

from fxqat.models.hf_zoo import MOE, ZOO, build

__all__ = ["ZOO", "MOE", "build"]
