"""Sparse autoencoders and transcoders: architectures, training, evaluation, every file format.

    coder = mechscope.sae.train(store, hook="blocks.6.hook_resid_post", arch="topk", n_latents=4096, k=32)
    coder = mechscope.sae.load("path/to/any/sae")        # native, SAELens, sparsify, Gemma Scope, ...
    f = coder.encode(x); x_hat = coder.decode(f)           # raw activations in, raw activations out
"""

from mechscope.sae.clt import CLTConfig, CrossLayerTranscoder
from mechscope.sae.coder import CoderOutput, LossOutput, SparseCoder
from mechscope.sae.config import ARCHS, SAEConfig
from mechscope.sae.io import FORMATS, detect_format, load, load_all, save
from mechscope.sae.metrics import EvalResult, SpliceResult, evaluate, splice_metrics
from mechscope.sae.synthetic import recovery, synthetic_data
from mechscope.sae.train import TrainConfig, train, train_many
from mechscope.sae.train_transcoders import train_transcoders
from mechscope.sae.transcoder_quality import TranscoderQuality, evaluate_transcoders
from mechscope.sae.transcoders import TranscoderMismatchError, TranscoderSet, load_transcoders

__all__ = [
    "ARCHS",
    "CLTConfig",
    "CrossLayerTranscoder",
    "FORMATS",
    "CoderOutput",
    "EvalResult",
    "LossOutput",
    "SAEConfig",
    "SparseCoder",
    "SpliceResult",
    "TrainConfig",
    "TranscoderQuality",
    "TranscoderMismatchError",
    "TranscoderSet",
    "detect_format",
    "evaluate",
    "evaluate_transcoders",
    "load",
    "load_all",
    "load_transcoders",
    "recovery",
    "save",
    "splice_metrics",
    "synthetic_data",
    "train",
    "train_many",
    "train_transcoders",
]
