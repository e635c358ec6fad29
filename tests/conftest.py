"""Shared fixtures: tiny random-init models of each family, saved and loaded the way users do."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/parity.py, tests/reference_impl.py

from parity import randomize_  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = ("the a cat dog sat on mat and ran to house big small red blue when mary john went store "
         "gave drink it was is of in that he she they we you i").split()


def make_word_tokenizer(add_bos: bool = True):
    """A tiny word-level fast tokenizer (offline), with BOS added by default like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine are ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """(hf_model, folder, our_model) for a 2-layer GPT-2 with a word tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechscope.models.loading import from_pretrained

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=32,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    randomize_(hf)
    folder = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return hf, folder, from_pretrained(str(folder))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(hf_model, folder, our_model) for a 2-layer Llama with GQA and a word tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechscope.models.loading import from_pretrained

    torch.manual_seed(1)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=64, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    randomize_(hf, seed=1)
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return hf, folder, from_pretrained(str(folder))


def make_tiny_lm(seed: int = 0, n_layers: int = 3):
    """A tiny Llama-shaped native model with the real SmolLM2 tokenizer (for harvesting real text)."""
    from transformers import AutoTokenizer

    from mechscope import HookedTransformer, ModelConfig
    from mechscope.models.loading import resolve_folder

    tok = AutoTokenizer.from_pretrained(str(resolve_folder("smollm2")))
    cfg = ModelConfig(d_model=32, n_layers=n_layers, n_heads=4, d_head=8, n_kv_heads=2, d_mlp=64,
                      d_vocab=len(tok), n_ctx=128, normalization="RMS", positional="rotary", gated_mlp=True,
                      act_fn="silu", tie_word_embeddings=True, model_name=f"tiny-lm-{seed}")
    return HookedTransformer(cfg, tokenizer=tok).init_weights(seed, std=0.1)


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory):
    """(folder, model): a saved native tiny LM with the SmolLM2 tokenizer (see make_tiny_lm)."""
    from mechscope import HookedTransformer

    folder = tmp_path_factory.mktemp("tiny-lm")
    make_tiny_lm(0).save_pretrained(folder)
    return folder, HookedTransformer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def induction_2l_folder(tmp_path_factory):
    """The zoo's induction-2l model (2-layer attention-only, a layer-1 induction head), trained once per
    test session (~60 s on an idle 2-core machine, ~2 min on a busy one) and shared by the zoo and
    circuits tests. Load it with `mechscope.zoo.load(folder)`."""
    from mechscope import zoo

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return zoo.train("induction-2l", tmp_path_factory.mktemp("induction-2l"), seed=0, progress=False)
    finally:
        torch.set_num_threads(n)
