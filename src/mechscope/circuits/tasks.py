"""Standard circuit tasks as data: IOI, induction, greater-than and factual recall.

Every task holds a clean and a corrupted batch of the same shape (so activations can be patched
position by position), the answer token ids and a differentiable metric of the logits
(attribution patching backpropagates through it). Prompts of one task have the same token length
by construction, so the answer sits at the same position in every row.

    task = ioi(model, 16)
    logits = model(task.clean_tokens)          # [B, T, V]
    task.metric(logits)                        # mean logit difference IO - S at the last position
    task.baseline(model)                       # (clean, corrupted) metric values

Shapes: B prompts, T positions, V vocabulary, P predicted positions (induction), C candidates.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from mechscope.errors import InputError, PromptMismatchError, TokenizerError

# ------------------------------------------------------------------------------ the Task types


class Baseline(NamedTuple):
    """The task metric on the unpatched clean and corrupted runs (the ends of a patching scale)."""

    clean: float
    corrupted: float


@dataclass(kw_only=True)
class Task:
    """A clean/corrupted pair of prompt batches and a metric of the model's logits.

    Subclasses define `metric_per_prompt`; `metric` is its mean, a differentiable scalar.
    """

    name: str
    clean_tokens: torch.Tensor  # [B, T]
    corrupted_tokens: torch.Tensor  # [B, T], same shape; differs only where the corruption acts
    answers: torch.Tensor  # [B] correct next-token ids ([B, P] for induction)
    wrong_answers: torch.Tensor | None = None  # [B] ids the metric contrasts with (None: no contrast)
    answer_pos: torch.Tensor  # [B] position whose logits predict the answer ([B, P] for induction)
    attention_mask: torch.Tensor | None = None  # [B, T]; None: no padding (the usual case here)
    clean_prompts: list[str] = field(default_factory=list)
    corrupted_prompts: list[str] = field(default_factory=list)
    positions: dict[str, torch.Tensor] = field(default_factory=dict)  # named positions, each [B]
    info: dict[str, Any] = field(default_factory=dict)  # how the task was built (templates, mode...)

    def __post_init__(self) -> None:
        if self.clean_tokens.shape != self.corrupted_tokens.shape:
            raise PromptMismatchError(f"clean and corrupted tokens differ in shape: {tuple(self.clean_tokens.shape)} "
                                      f"vs {tuple(self.corrupted_tokens.shape)}.")

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.clean_tokens.device

    def _check(self, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != self.clean_tokens.shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"{self.name} metric needs the logits [batch, pos, vocab] of this task's prompts "
                             f"(batch, pos = {tuple(self.clean_tokens.shape)}), got {shape}.")
        return logits

    def _at_answer(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits at each row's answer position: [B, V] (float32, differentiable)."""
        rows = torch.arange(len(self), device=logits.device)
        return self._check(logits)[rows, self.answer_pos.to(logits.device)].float()

    def metric_per_prompt(self, logits: torch.Tensor) -> torch.Tensor:  # [B, T, V] -> [B]
        raise NotImplementedError

    def metric(self, logits: torch.Tensor) -> torch.Tensor:  # [B, T, V] -> scalar
        """The mean of metric_per_prompt: a differentiable scalar."""
        return self.metric_per_prompt(logits).mean()

    @torch.no_grad()
    def baseline(self, model: Any) -> Baseline:
        """The metric on the clean and on the corrupted prompts, run through `model`."""
        m = self.attention_mask
        clean = self.metric(model(self.clean_tokens, attention_mask=m))
        corrupted = self.metric(model(self.corrupted_tokens, attention_mask=m))
        return Baseline(float(clean), float(corrupted))


@dataclass(kw_only=True)
class LogitDiffTask(Task):
    """Metric: logit(answer) - logit(wrong answer) at the answer position (IOI, factual recall).

    `metric` is a `circuits.patching.LogitDiff`: the same value as the mean of metric_per_prompt, but it
    declares the position it reads, so patching sweeps unembed only that position (one of T)."""

    @property
    def metric(self):  # type: ignore[override]  # a callable object instead of a method: same calls
        from mechscope.circuits.metrics import LogitDiff

        return _CheckedLogitDiff(self, LogitDiff(self.answers, self.wrong_answers, self.answer_pos))

    def metric_per_prompt(self, logits: torch.Tensor) -> torch.Tensor:  # [B, T, V] -> [B]
        at = self._at_answer(logits)  # [B, V]
        right = at.gather(1, self.answers.to(at.device)[:, None])
        wrong = at.gather(1, self.wrong_answers.to(at.device)[:, None])
        return (right - wrong)[:, 0]


class _CheckedLogitDiff:
    """LogitDiff with the task's shape check on direct calls; `batched` / `logit_positions` pass through."""

    def __init__(self, task: Task, inner: Any) -> None:
        self.task, self.inner = task, inner
        self.logit_positions = inner.logit_positions

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # [B, T, V] -> scalar
        return self.inner(self.task._check(logits))

    def batched(self, logits: torch.Tensor) -> torch.Tensor:  # [P, B, n, V] -> [P]
        return self.inner.batched(logits)


@dataclass(kw_only=True)
class GreaterThanTask(Task):
    """Metric (Hanna et al. 2023): probability of the years after the start year minus the
    probability of the years up to it, over the candidate year tokens. answers [B] holds the
    start year's own candidate token (the boundary: candidates after it count as greater)."""

    year_tokens: torch.Tensor  # [C] candidate ids (two-digit years or tens digits)
    greater: torch.Tensor  # [B, C] bool: candidate c continues to a year after the start year

    def metric_per_prompt(self, logits: torch.Tensor) -> torch.Tensor:  # [B, T, V] -> [B]
        probs = self._at_answer(logits).softmax(-1)[:, self.year_tokens.to(logits.device)]  # [B, C]
        sign = self.greater.to(probs.device).float() * 2 - 1
        return (probs * sign).sum(-1)


@dataclass(kw_only=True)
class InductionTask(Task):
    """Metric: mean log-probability of the correct next token over the second copy of r.

    answers [B, P] are the tokens to predict, read at answer_pos [B, P]."""

    def metric_per_prompt(self, logits: torch.Tensor) -> torch.Tensor:  # [B, T, V] -> [B]
        logits = self._check(logits)
        rows = torch.arange(len(self), device=logits.device)[:, None]
        logp = logits[rows, self.answer_pos.to(logits.device)].float().log_softmax(-1)  # [B, P, V]
        return logp.gather(-1, self.answers.to(logits.device)[..., None])[..., 0].mean(-1)


# ------------------------------------------------------------------------------ tokenizer helpers


def _split_source(model_or_tokenizer: Any) -> tuple[Any, Any, torch.device]:
    """(model or None, tokenizer, device) from a HookedTransformer or a bare tokenizer."""
    if hasattr(model_or_tokenizer, "cfg") and hasattr(model_or_tokenizer, "blocks"):
        model = model_or_tokenizer
        if model.tokenizer is None:
            raise TokenizerError("This task builds prompts from text: the model needs a tokenizer.")
        return model, model.tokenizer, model.device
    if callable(model_or_tokenizer) and hasattr(model_or_tokenizer, "convert_ids_to_tokens"):
        return None, model_or_tokenizer, torch.device("cpu")
    raise InputError(f"Expected a HookedTransformer or a Hugging Face tokenizer, got {type(model_or_tokenizer).__name__}.")


def _wants_bos(model: Any, tok: Any, prepend_bos: bool | None) -> bool:
    """prepend_bos=None follows the tokenizer's default, as model.to_tokens does."""
    if prepend_bos is not None:
        if prepend_bos and tok.bos_token_id is None:
            raise TokenizerError("prepend_bos=True but the tokenizer has no BOS token.")
        return prepend_bos
    if model is not None:
        return model.default_prepend_bos()
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id


def _encode(tok: Any, texts: Sequence[str], bos: bool) -> list[list[int]]:
    """Token ids of each text without the tokenizer's own special tokens, BOS first if asked."""
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    return [([tok.bos_token_id] if bos else []) + list(s) for s in ids]


def single_tokens(tok: Any, words: Sequence[str], prefix: str = " ") -> dict[str, int]:
    """The words that are one token with `prefix` (a leading space by default): word -> id."""
    ids = tok([prefix + w for w in words], add_special_tokens=False)["input_ids"]
    return {w: s[0] for w, s in zip(words, ids) if len(s) == 1}


def allowed_token_ids(model: Any) -> torch.Tensor:
    """Ids that random-token tasks may use: the model's vocabulary minus the tokenizer's special
    and added tokens (BOS, EOS, pad, chat markers) and ids past the tokenizer's size. [N]."""
    d_vocab = model.cfg.d_vocab
    tok = model.tokenizer
    keep = torch.ones(d_vocab, dtype=torch.bool)
    if tok is not None:
        keep[min(len(tok), d_vocab):] = False
        special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
        keep[[i for i in special if 0 <= i < d_vocab]] = False
    return keep.nonzero()[:, 0]


def bos_token_id(model: Any, prepend_bos: bool | None) -> int | None:
    """The BOS id to put first in generated sequences, or None. prepend_bos=None: BOS when the
    tokenizer defines one (TransformerLens's convention for random-token probes)."""
    tok = model.tokenizer
    bos = tok.bos_token_id if tok is not None else None
    if prepend_bos and bos is None:
        raise TokenizerError("prepend_bos=True but the model has no tokenizer with a BOS token.")
    return bos if prepend_bos is not False else None


def repeated_random_tokens(model: Any, n_seqs: int, seq_len: int, *, seed: int = 0,
                           prepend_bos: bool | None = None, n_halves: int = 2) -> torch.Tensor:
    """BOS + r + r (n_halves copies of r): [n_seqs, (1) + n_halves * seq_len], on the model's device.

    r has seq_len distinct ordinary tokens (no special tokens, no repeats within a row), so every
    token of a later copy has exactly one earlier occurrence and induction targets are unambiguous.
    """
    r = _distinct_random(model, n_seqs, seq_len, seed)  # [n, L]
    parts = [r] * n_halves
    bos = bos_token_id(model, prepend_bos)
    if bos is not None:
        parts.insert(0, torch.full((n_seqs, 1), bos, dtype=torch.long))
    return torch.cat(parts, dim=1).to(model.device)


def _distinct_random(model: Any, n_seqs: int, width: int, seed: int) -> torch.Tensor:
    """[n_seqs, width] ordinary token ids, distinct within each row (CPU)."""
    if not isinstance(n_seqs, int) or not isinstance(width, int) or n_seqs < 1 or width < 1:
        raise InputError(f"n_seqs and seq_len must be positive integers, got {n_seqs!r} and {width!r}.")
    allowed = allowed_token_ids(model)
    if width > len(allowed):
        raise InputError(f"seq_len {width} exceeds the {len(allowed)} ordinary tokens of the vocabulary; "
                         "tokens of r must be distinct.")
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(n_seqs, len(allowed), generator=g).topk(width, dim=-1).indices  # random distinct
    return allowed[pick]


# ------------------------------------------------------------------------------ IOI

# Wang et al. 2022 (IOI) templates and a few more in the same style. {S} is the subject (named
# twice: S1, S2), {IO} the indirect object; written in BABA order (S first) and flipped to ABBA.
IOI_TEMPLATES: tuple[str, ...] = (
    "Then, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {S} and {IO} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {S} and {IO} were working at the {PLACE}. {S} decided to give a {OBJECT} to",
    "Then, {S} and {IO} were thinking about going to the {PLACE}. {S} wanted to give a {OBJECT} to",
    "Then, {S} and {IO} had a long argument, and afterwards {S} said to",
    "After {S} and {IO} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {S} and {IO} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "When {S} and {IO} got a {OBJECT} at the {PLACE}, {S} decided to give the {OBJECT} to",
    "While {S} and {IO} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "While {S} and {IO} were commuting to the {PLACE}, {S} gave a {OBJECT} to",
    "After the lunch, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Afterwards, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {S} and {IO} had a long argument. Afterwards {S} said to",
    "The {PLACE} {S} and {IO} went to had a {OBJECT}. {S} gave it to",
    "Friends {S} and {IO} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "Then, {S} and {IO} walked to the {PLACE}. {S} handed a {OBJECT} to",
    "Later, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Yesterday {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Today {S} and {IO} went to the {PLACE}, and {S} gave a {OBJECT} to",
)

IOI_NAMES: tuple[str, ...] = tuple(
    "Mary John Alice Bob Tom James Michael David Sarah Emma Anna Paul Mark Peter Kate Jane Lisa Laura Rachel "
    "Daniel Kevin Ryan Eric Adam Alex Andrew Anthony Arthur Brian Charles Chris Edward Frank George Henry Jack "
    "Jacob Jason Joseph Justin Luke Matthew Max Patrick Richard Robert Sam Scott Simon Steven Thomas William Amy "
    "Emily Grace Helen Jessica Julia Linda Maria Nancy Olivia Rose Ruth Susan Victoria Ben Dan Joe Tim Nick Mike "
    "Steve Carl Greg Ian Leo Neil Roger Sean Tony Victor Harry Oliver Charlie Lucy Sophie".split())
IOI_PLACES: tuple[str, ...] = tuple("store garden restaurant school hospital office house station park beach market "
                                    "library church airport kitchen bank hotel museum theater".split())
IOI_OBJECTS: tuple[str, ...] = tuple("ring kiss bone basketball computer necklace drink snack apple book ball pen "
                                     "letter gift phone key bag hat cake flower".split())
IOI_CORRUPTIONS = ("abc", "flip", "xyz")
_REF_FILLERS = ({"IO": "Mary", "S": "John", "PLACE": "store", "OBJECT": "ring"},
                {"IO": "Paul", "S": "Anna", "PLACE": "garden", "OBJECT": "book"})


def _slots(template: str) -> list[str]:
    """Slot names in order of appearance; checks what an IOI template must contain."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise InputError(f"IOI template {template!r} is not a valid format string: {e}.") from None
    slots = []
    for text, name, _, _ in parsed:
        if name is None:
            continue
        if name not in ("IO", "S", "PLACE", "OBJECT"):
            raise InputError(f"IOI template {template!r} has slot {{{name}}}; slots are IO, S, PLACE, OBJECT.")
        if not text.endswith(" "):
            raise InputError(f"IOI template {template!r}: slot {{{name}}} must follow a space (fillers are "
                             "single tokens with a leading space).")
        slots.append(name)
    if slots.count("IO") != 1 or slots.count("S") != 2 or slots.index("IO") > slots.index("S", slots.index("S") + 1):
        raise InputError(f"IOI template {template!r} needs one {{IO}} and two {{S}} with {{IO}} before the second "
                         "{S}; it ends where the indirect object should be predicted.")
    return slots


def _abba(template: str) -> str:
    """The same template with the first mentions of S and IO swapped (IO first)."""
    i, j = template.index("{S}"), template.index("{IO}")
    a, b = sorted((i, j))
    first, second = template[a:a + (3 if a == i else 4)], template[b:b + (3 if b == i else 4)]
    return template[:a] + second + template[a + len(first):b] + first + template[b + len(second):]


def _slot_positions(tok: Any, template: str, bos: bool) -> tuple[int, list[int]] | None:
    """(token length, position of each slot) of a template, found by tokenizing it with two sets
    of fillers and diffing; None if the template's length depends on the fillers."""
    a, b = _encode(tok, [template.format(**f) for f in _REF_FILLERS], bos)
    if len(a) != len(b):
        return None
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return (len(a), diff) if len(diff) == len(_slots(template)) else None


def ioi(model_or_tokenizer: Any, n: int, *, seed: int = 0, templates: Sequence[str] | None = None,
        names: Sequence[str] | None = None, places: Sequence[str] | None = None,
        objects: Sequence[str] | None = None, corruption: str = "abc", order: str = "both",
        prepend_bos: bool | None = None) -> LogitDiffTask:
    """Indirect object identification (Wang et al. 2022): "...Mary and John went to the store.
    John gave a drink to" -> " Mary". Metric: logit(IO) - logit(S) at the last position.

    Names, places and objects are kept only if they are a single token with a leading space for
    this tokenizer, so a template has one token length. All prompts of a call share a length: the
    default templates are grouped by length and the largest group is used (info["templates"]);
    user templates of different lengths raise PromptMismatchError. Prompts cycle through
    (template, order) pairs in a seeded shuffle, order "ABBA" (IO first), "BABA" or "both".

    corruption: "abc" (Wang et al.'s ABC distribution: a third name C replaces S2, so the
    corrupted prompt differs only at S2 and gives no reason to prefer IO over S); "flip" (IO and
    S swapped everywhere: the metric changes sign); "xyz" (three fresh names at IO, S1, S2).
    positions holds "IO", "S1", "S2" and "end" ([B] each).
    """
    model, tok, device = _split_source(model_or_tokenizer)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}.")
    if corruption not in IOI_CORRUPTIONS:
        raise InputError(f"Unknown IOI corruption {corruption!r}; choose one of {', '.join(IOI_CORRUPTIONS)}.")
    if order not in ("both", "ABBA", "BABA"):
        raise InputError(f"order must be 'both', 'ABBA' or 'BABA', got {order!r}.")
    bos = _wants_bos(model, tok, prepend_bos)
    name_ids = single_tokens(tok, list(names or IOI_NAMES))
    need = 4 if corruption == "xyz" else 3
    if len(name_ids) < need:
        raise TokenizerError(f"Only {len(name_ids)} of the names are single tokens (with a leading space) for this "
                             f"tokenizer; corruption {corruption!r} needs {need} distinct names. Pass names=.")
    place_ids, object_ids = single_tokens(tok, list(places or IOI_PLACES)), single_tokens(tok, list(objects or IOI_OBJECTS))
    if not place_ids or not object_ids:
        raise TokenizerError("No place or no object is a single token for this tokenizer; pass places=/objects=.")

    # every (template, order) variant with its length and slot positions
    variants: dict[int, list[tuple[int, str, str, list[str], list[int]]]] = {}
    user = templates is not None
    for t_id, template in enumerate(templates if user else IOI_TEMPLATES):
        slots = _slots(template)
        for o in (("BABA", "ABBA") if order == "both" else (order,)):
            text = template if (o == "BABA") == (slots.index("S") < slots.index("IO")) else _abba(template)
            found = _slot_positions(tok, text, bos)
            if found is None:
                raise TokenizerError(f"IOI template {text!r} does not tokenize with a fixed length here; drop it.")
            length, pos = found
            variants.setdefault(length, []).append((t_id, o, text, _slots(text), pos))
    if user and len(variants) > 1:
        lengths = {k: sorted({v[2] for v in vs}) for k, vs in variants.items()}
        raise PromptMismatchError(f"IOI templates have different token lengths for this tokenizer ({lengths}); "
                                  "pass templates of one length so prompts align.")
    length = max(variants, key=lambda k: (len({v[0] for v in variants[k]}), -k))  # most templates, then shortest
    pool = variants[length]

    rng = random.Random(seed)
    order_of = list(range(len(pool)))
    rng.shuffle(order_of)
    names_list = sorted(name_ids)
    clean_ids, corrupt_ids, clean_txt, corrupt_txt = [], [], [], []
    answers, wrong, pos_io, pos_s1, pos_s2, t_ids, orders = [], [], [], [], [], [], []
    for i in range(n):
        t_id, o, text, slots, slot_pos = pool[order_of[i % len(pool)]]
        # four names whatever the corruption, so one seed gives the same clean prompts for each
        io, s, c, x = rng.sample(names_list, min(4, len(names_list))) + [""] * (4 - min(4, len(names_list)))
        fill = {"IO": io, "S": s, "PLACE": rng.choice(sorted(place_ids)), "OBJECT": rng.choice(sorted(object_ids))}
        s_slots = [p for p, name in zip(slot_pos, slots) if name == "S"]
        io_pos = slot_pos[slots.index("IO")]
        if corruption == "abc":
            swaps = {s_slots[1]: c}
        elif corruption == "flip":
            swaps = {io_pos: s, s_slots[0]: io, s_slots[1]: io}
        else:
            swaps = {io_pos: c, s_slots[0]: x, s_slots[1]: x}
        clean_txt.append(text.format(**fill))
        corrupt_txt.append(_fill_positions(text, slots, slot_pos, fill, swaps))
        answers.append(name_ids[io])
        wrong.append(name_ids[s])
        pos_io.append(io_pos)
        pos_s1.append(s_slots[0])
        pos_s2.append(s_slots[1])
        t_ids.append(t_id)
        orders.append(o)
    clean_ids, corrupt_ids = _encode(tok, clean_txt, bos), _encode(tok, corrupt_txt, bos)
    _check_lengths(clean_ids + corrupt_ids, length, clean_txt + corrupt_txt)
    clean = torch.tensor(clean_ids, dtype=torch.long, device=device)
    corrupted = torch.tensor(corrupt_ids, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)
    answers_t = torch.tensor(answers, device=device)
    pos = {k: torch.tensor(v, device=device) for k, v in (("IO", pos_io), ("S1", pos_s1), ("S2", pos_s2))}
    if not (bool((clean[rows, pos["IO"]] == answers_t).all()) and bool((clean[rows, pos["S2"]] == torch.tensor(
            wrong, device=device)).all())):
        raise TokenizerError("A name did not tokenize at its expected position in an IOI prompt.")
    pos["end"] = torch.full((n,), length - 1, device=device)
    used = templates if user else IOI_TEMPLATES
    return LogitDiffTask(
        name="ioi", clean_tokens=clean, corrupted_tokens=corrupted, answers=answers_t,
        wrong_answers=torch.tensor(wrong, device=device), answer_pos=pos["end"].clone(), clean_prompts=clean_txt,
        corrupted_prompts=corrupt_txt, positions=pos,
        info={"corruption": corruption, "templates": sorted({used[t] for t in t_ids}),
              "template_ids": t_ids, "orders": orders, "names": names_list, "prepend_bos": bos},
    )


def _fill_positions(text: str, slots: list[str], slot_pos: list[int], fill: dict[str, str],
                    swaps: dict[int, str]) -> str:
    """The template filled slot by slot, with the names at the positions in `swaps` replaced."""
    values = [swaps.get(p, fill[name]) for name, p in zip(slots, slot_pos)]
    out, k = [], 0
    for literal, name, _, _ in string.Formatter().parse(text):
        out.append(literal)
        if name is not None:
            out.append(values[k])
            k += 1
    return "".join(out)


def _check_lengths(ids: list[list[int]], length: int, texts: list[str]) -> None:
    bad = [t for s, t in zip(ids, texts) if len(s) != length]
    if bad:
        raise TokenizerError(f"{len(bad)} prompts do not tokenize to {length} tokens (e.g. {bad[0]!r}); "
                             "a filler merges with its neighbours for this tokenizer.")


# ------------------------------------------------------------------------------ factual recall

# relation -> (template with {X}, [(subject, answer)]); subjects and answers are single tokens
# with a leading space for most tokenizers (others are dropped per tokenizer).
FACTS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "capital": ("The capital of {X} is", (
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
        ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("England", "London"),
        ("Greece", "Athens"), ("Austria", "Vienna"), ("Canada", "Ottawa"), ("Ireland", "Dublin"),
        ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
        ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Finland", "Helsinki"),
        ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
        ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Korea", "Seoul"), ("Scotland", "Edinburgh"),
    )),
    "language": ("The official language of {X} is", (
        ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
        ("Japan", "Japanese"), ("China", "Chinese"), ("Russia", "Russian"), ("Greece", "Greek"),
        ("Poland", "Polish"), ("Portugal", "Portuguese"), ("Sweden", "Swedish"), ("Finland", "Finnish"),
        ("Turkey", "Turkish"), ("Korea", "Korean"), ("Hungary", "Hungarian"), ("Denmark", "Danish"),
    )),
}


def factual_recall(model_or_tokenizer: Any, n: int | None = None, *, relation: str = "capital", seed: int = 0,
                   prepend_bos: bool | None = None) -> LogitDiffTask:
    """Built-in facts ("The capital of France is" -> " Paris"). The corrupted prompt names
    another subject of the same relation (a seeded derangement), and the wrong answer is that
    subject's answer, so the metric logit(right) - logit(wrong) flips sign on the corrupted run.
    Facts whose subject or answer is not one token with a leading space are dropped, so every
    prompt has the same length; n=None keeps all, else n rows (facts repeat if n exceeds them)."""
    model, tok, device = _split_source(model_or_tokenizer)
    if relation not in FACTS:
        raise InputError(f"Unknown relation {relation!r}; relations: {', '.join(FACTS)}.")
    template, facts = FACTS[relation]
    subj, ans = single_tokens(tok, [s for s, _ in facts]), single_tokens(tok, [a for _, a in facts])
    facts = [(s, a) for s, a in facts if s in subj and a in ans]
    if len(facts) < 2:
        raise TokenizerError(f"Fewer than 2 {relation!r} facts are single tokens for this tokenizer.")
    n = len(facts) if n is None else n
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer or None, got {n!r}.")
    rng = random.Random(seed)
    rows = [facts[i % len(facts)] for i in range(n)]
    others = []
    for s, a in rows:  # another subject whose answer differs (not the same capital twice)
        others.append(rng.choice([f for f in facts if f[0] != s and f[1] != a]))
    bos = _wants_bos(model, tok, prepend_bos)
    clean_txt = [template.format(X=s) for s, _ in rows]
    corrupt_txt = [template.format(X=s) for s, _ in others]
    clean_ids, corrupt_ids = _encode(tok, clean_txt, bos), _encode(tok, corrupt_txt, bos)
    length = len(clean_ids[0])
    _check_lengths(clean_ids + corrupt_ids, length, clean_txt + corrupt_txt)
    subj_pos = next(i for i, (x, y) in enumerate(zip(clean_ids[0], corrupt_ids[0])) if x != y)  # subjects differ
    return LogitDiffTask(
        name=f"factual_recall:{relation}", clean_tokens=torch.tensor(clean_ids, device=device),
        corrupted_tokens=torch.tensor(corrupt_ids, device=device),
        answers=torch.tensor([ans[a] for _, a in rows], device=device),
        wrong_answers=torch.tensor([ans[a] for _, a in others], device=device),
        answer_pos=torch.full((n,), length - 1, device=device), clean_prompts=clean_txt, corrupted_prompts=corrupt_txt,
        positions={"subject": torch.full((n,), subj_pos, device=device), "end": torch.full((n,), length - 1, device=device)},
        info={"relation": relation, "facts": rows, "corrupting_facts": others, "prepend_bos": bos},
    )


# ------------------------------------------------------------------------------ greater-than

GT_NOUNS: tuple[str, ...] = ("war", "expedition", "project", "campaign", "reign", "dynasty", "occupation", "journey",
                             "construction", "strike", "conflict", "siege", "voyage", "rebellion", "program")
GT_TEMPLATE = "The {noun} lasted from the year {cc}{yy} to the year {cc}"


def greater_than(model_or_tokenizer: Any, n: int, *, seed: int = 0, centuries: Sequence[int] = (17,),
                 prepend_bos: bool | None = None) -> GreaterThanTask:
    """Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17".
    Metric: P(years after the start year) - P(years up to it), over the candidate tokens.

    The answer must be one token, so the design depends on how the tokenizer splits numbers:
    - two-digit mode (GPT-2 style, "17" + "32"): candidates are the 100 tokens "00".."99", start
      years YY in 02..98, corrupted start year YY = 01 (as in the paper);
    - digit mode (Llama/SmolLM2 style, one token per digit): the next token is the tens digit, so
      start years end in 9 (CC d 9, d in 1..8): every later year in the century has tens digit
      > d and every earlier one <= d, which makes the tens digit decide the comparison exactly.
      Candidates are the digits 0-9; corrupted start year CC09.
    Nouns that change the token length are dropped. info["mode"] says which design was used.
    """
    model, tok, device = _split_source(model_or_tokenizer)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}.")
    if not centuries or any(not (10 <= c <= 99) for c in centuries):
        raise InputError(f"centuries must be two-digit numbers like 17, got {list(centuries)!r}.")
    bos = _wants_bos(model, tok, prepend_bos)
    ref = GT_TEMPLATE.format(noun="war", cc=centuries[0], yy="32")
    base = _encode(tok, [ref], bos)[0]
    mode, cands = None, None
    for width in (2, 1):
        words = [f"{i:0{width}d}" for i in range(10 ** width)]
        ext = _encode(tok, [ref + w for w in words], bos)
        if all(len(e) == len(base) + 1 and e[:-1] == base for e in ext) and len({e[-1] for e in ext}) == len(words):
            mode, cands = ("two_digit" if width == 2 else "digit"), [e[-1] for e in ext]
            break
    if mode is None:
        raise TokenizerError("This tokenizer splits years so that neither a two-digit year nor a digit is one token "
                             "after the prompt; greater-than needs a single-token answer.")
    starts = list(range(2, 99)) if mode == "two_digit" else [10 * d + 9 for d in range(1, 9)]
    corrupt_yy = 1 if mode == "two_digit" else 9
    combos = [(noun, cc, yy) for noun in GT_NOUNS for cc in centuries for yy in starts]
    texts = [GT_TEMPLATE.format(noun=a, cc=c, yy=f"{y:02d}") for a, c, y in combos]
    lengths = [len(s) for s in _encode(tok, texts, bos)]
    length = max(set(lengths), key=lambda k: (lengths.count(k), -k))
    combos = [c for c, k in zip(combos, lengths) if k == length]
    rng = random.Random(seed)
    rows = [rng.choice(combos) for _ in range(n)]
    clean_txt = [GT_TEMPLATE.format(noun=a, cc=c, yy=f"{y:02d}") for a, c, y in rows]
    corrupt_txt = [GT_TEMPLATE.format(noun=a, cc=c, yy=f"{corrupt_yy:02d}") for a, c, _ in rows]
    clean_ids, corrupt_ids = _encode(tok, clean_txt, bos), _encode(tok, corrupt_txt, bos)
    _check_lengths(clean_ids + corrupt_ids, length, clean_txt + corrupt_txt)
    yy = torch.tensor([y for _, _, y in rows])
    boundary = yy if mode == "two_digit" else yy // 10  # [B] the candidate index of the start year
    greater = torch.arange(len(cands))[None] > boundary[:, None]  # candidate c: year c or tens digit c
    return GreaterThanTask(
        name="greater_than", clean_tokens=torch.tensor(clean_ids, device=device),
        corrupted_tokens=torch.tensor(corrupt_ids, device=device),
        answers=torch.tensor(cands, device=device)[boundary.to(device)], wrong_answers=None,
        answer_pos=torch.full((n,), length - 1, device=device), clean_prompts=clean_txt, corrupted_prompts=corrupt_txt,
        positions={"end": torch.full((n,), length - 1, device=device)},
        year_tokens=torch.tensor(cands, device=device), greater=greater.to(device),
        info={"mode": mode, "rows": rows, "prepend_bos": bos},
    )


# ------------------------------------------------------------------------------ induction


def induction(model: Any, n: int, seq_len: int = 20, *, seed: int = 0, prepend_bos: bool | None = None) -> InductionTask:
    """Repeated random tokens: clean BOS + r + r, corrupted BOS + r' + r with r' fresh tokens
    (none shared with r), so only the clean run can predict the second copy by induction.
    Metric: mean log-probability of the correct next token over the second copy (positions that
    predict r[1:], read at answer_pos [B, seq_len - 1]). answers [B, seq_len - 1] are those tokens."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise InputError(f"seq_len must be an integer >= 2 (the metric predicts r[1:]), got {seq_len!r}.")
    both = _distinct_random(model, n, 2 * seq_len, seed)  # [n, 2L] distinct per row
    r, fresh = both[:, :seq_len], both[:, seq_len:]
    bos = bos_token_id(model, prepend_bos)
    head = [torch.full((n, 1), bos, dtype=torch.long)] if bos is not None else []
    clean = torch.cat(head + [r, r], dim=1).to(model.device)
    corrupted = torch.cat(head + [fresh, r], dim=1).to(model.device)
    o = len(head)
    pos = (o + seq_len + torch.arange(seq_len - 1)).expand(n, -1).to(model.device)  # [B, L - 1]
    return InductionTask(
        name="induction", clean_tokens=clean, corrupted_tokens=corrupted, answers=r[:, 1:].to(model.device),
        answer_pos=pos, positions={"second_copy_start": torch.full((n,), o + seq_len, device=model.device)},
        info={"seq_len": seq_len, "prepend_bos": bos is not None},
    )
