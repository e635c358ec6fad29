"""Steering SmolLM2 with a contrastive sentiment vector: how much does it shift generations, per scale?

    python benchmarks/steering.py [--model smollm2] [--layer 12] [--new-tokens 24]

The vector is the mean difference of resid_post at the last token of positive vs negative sentences (contrastive
activation addition). It is added at every position of neutral prompts while generating greedily. Measured per
scale: the probability mass the next token after each prompt puts on a positive vs a negative word set, the share
of positive vs negative words in the generated text, and the mean log-prob the unsteered model gives the steered
text (a fluency check: steering too hard produces text the model itself finds unlikely).
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from mechscope import HookedTransformer, edit

POSITIVE = ["I love this, it is wonderful.", "What a great and happy day!", "The food was delicious and amazing.",
            "She was delighted with the excellent result.", "This is the best film I have seen, truly beautiful.",
            "We had a fantastic, joyful time together.", "The service was friendly and perfect.",
            "He felt grateful and proud of the lovely gift."]
NEGATIVE = ["I hate this, it is terrible.", "What an awful and sad day!", "The food was disgusting and bland.",
            "She was furious about the horrible result.", "This is the worst film I have seen, truly ugly.",
            "We had a miserable, painful time together.", "The service was rude and broken.",
            "He felt ashamed and angry about the nasty gift."]
NEUTRAL = ["The weather today is", "My neighbour's new car is", "The meeting this morning was", "I think the book is",
           "Yesterday the train was", "The report on the table is", "Our trip to the city was",
           "The dinner last night was"]
POS_WORDS = {"good", "great", "love", "happy", "wonderful", "amazing", "beautiful", "best", "perfect", "excellent",
             "nice", "lovely", "fantastic", "delicious", "joy", "joyful", "delighted", "fun", "glad", "pleasant"}
NEG_WORDS = {"bad", "terrible", "hate", "sad", "awful", "horrible", "worst", "ugly", "angry", "disgusting",
             "miserable", "rude", "nasty", "boring", "poor", "broken", "painful", "furious", "annoying", "dull"}


def word_ids(model, words: set[str]) -> torch.Tensor:
    ids = set()
    for w in words:
        for form in (" " + w, " " + w.capitalize()):
            toks = model.tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:
                ids.add(toks[0])
    return torch.tensor(sorted(ids))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--scales", default="0,2,4,6,8,12")
    a = p.parse_args()
    torch.set_num_threads(2)
    model = HookedTransformer.from_pretrained(a.model)
    hook = f"blocks.{a.layer}.hook_resid_post"
    t0 = time.time()
    v = edit.contrastive_vector(model, POSITIVE, NEGATIVE, hook)
    print(f"vector: {hook}, norm {float(v.norm()):.2f} (typical resid norm at the last token: "
          f"{float(model.run_with_cache(NEUTRAL[0], names_filter=hook)[1][hook][0, -1].norm()):.2f})")
    pos_ids, neg_ids = word_ids(model, POS_WORDS), word_ids(model, NEG_WORDS)
    print("| scale | P(positive words) next | P(negative words) next | positive words | negative words | "
          "mean log-prob (unsteered model) |")
    print("|---|---|---|---|---|---|")
    for scale in [float(s) for s in a.scales.split(",")]:
        iv = edit.steer(v, hook, scale=scale)
        with torch.no_grad():
            tokens, mask = model.prepare(NEUTRAL, padding_side="left")
            probs = model(tokens, attention_mask=mask, interventions=[iv])[:, -1].softmax(-1)
            p_pos, p_neg = float(probs[:, pos_ids].sum(-1).mean()), float(probs[:, neg_ids].sum(-1).mean())
            texts = model.generate(NEUTRAL, a.new_tokens, interventions=[iv])
            words = [w.lower() for t, prompt in zip(texts, NEUTRAL) for w in re.findall(r"[A-Za-z]+", t[len(prompt):])]
            n_pos, n_neg = sum(w in POS_WORDS for w in words), sum(w in NEG_WORDS for w in words)
            toks, m = model.prepare(texts, padding_side="right")
            lp = model(toks, attention_mask=m).log_softmax(-1)[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]
            valid = (m[:, 1:] * m[:, :-1]).bool() if m is not None else torch.ones_like(lp, dtype=torch.bool)
            fluency = float(lp[valid].mean())
        print(f"| {scale:g} | {p_pos:.3f} | {p_neg:.3f} | {n_pos} | {n_neg} | {fluency:.2f} |")
        if scale in (0.0, 6.0):
            print(f"    e.g. {texts[0]!r}")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
