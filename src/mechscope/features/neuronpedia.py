"""Export feature statistics in Neuronpedia's own import format (its database rows, as gzipped JSONL).

    export_neuronpedia(stats, model.tokenizer, "out/np", model_id="smollm2-135m", source_id="15-res-mechscope")
    # out/np/smollm2-135m/15-res-mechscope/{source.jsonl, features/batch-0.jsonl.gz,
    #                                       activations/batch-0.jsonl.gz, explanations/batch-0.jsonl.gz}

The layout and the field names are those of Neuronpedia's export/import tooling (repo hijohnnylin/neuronpedia):
`utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py` writes exactly these
folders (`features/`, `activations/`, `explanations/`, batch-N.jsonl.gz, one JSON object per line), with rows
shaped by `neuronpedia_utils/db_models/{feature,activation,explanation,source}.py`, which mirror the Prisma
models `Neuron`, `Activation`, `Explanation` and `Source` of `apps/webapp/prisma/schema.prisma`. (SAEDashboard's
`neuronpedia_converter.py` produces the same feature fields, snake_case ones included, from its own data.)

Fields filled, and from what:

Feature (`Neuron`): modelId, layer (= source_id, Neuronpedia's "{layer}-{set}" id), index (str of the latent),
  maxActApprox = act_max (the exact max over the whole pass, not an approximation), frac_nonzero = density,
  freq_hist_data_bar_heights / freq_hist_data_bar_values = the nonzero-activation histogram counts and bin
  centres (geometric, the bins being log-spaced), trimmed to the occupied bin range; pos_str / pos_values and
  neg_str / neg_values = the tokens most promoted / suppressed by the direct logit effect, with the effect
  (empty when the stats have none); hookName = the coder's hook; hasVector False (no decoder row exported).
  The other Neuron columns (correlations, alignments, logit histograms, decoder_weights_dist, cos-sim, umap) are
  written with their schema defaults (empty lists), as Neuronpedia's own tooling does for data it lacks.
Activation: one per top-activating example: tokens (each token decoded alone, as Neuronpedia shows them),
  values (the latent's activation on every token), maxValue, maxValueTokenIndex (the example's max position),
  minValue, dataIndex (the context id in mechscope's packed stream), qualifyingTokenIndex (the same position),
  binMin -1 / binMax = maxActApprox / binContains -1 (how SAEDashboard marks its top-activation group),
  id (deterministic: a hash of model, source, latent and rank, so a re-export replaces rather than duplicates).
  Quantile samples are not exported: FeatureStats keeps their location, not their tokens.
Explanation: id, modelId, layer, index, description (the explanation text), authorId (creator_id), notes
  (the explanation's `source`, e.g. the explainer), typeName / explanationModelName when given. Scores are not
  exported (Neuronpedia's score rows need score types registered on the instance).
Source (`db_models/source.py`): id, modelId, setName (source_id without the layer prefix), creatorId,
  hasDashboards, inferenceEnabled False (no inference server serves a mechscope coder), visibility, num_prompts
  (contexts read), num_tokens_in_prompt (context length), dataset (the text source mechscope read), notes.
Names follow the Prisma schema where the Python db_models differ (Explanation.triggeredByUserId).

creatorId / authorId must be a user id on the target Neuronpedia instance; pass creator_id (None leaves it null
for the importer to fill). createdAt is the export time (ISO 8601, UTC).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import InputError, OutputNotWritableError
from mechscope.features.dashboard import explanation_map, pick_rows, token_texts
from mechscope.fileio import atomic_write_bytes
from mechscope.models.hooks import split_hook_name

__all__ = ["export_neuronpedia", "neuronpedia_model_id", "neuronpedia_source_id"]

_MODEL_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_SOURCE_ID = re.compile(r"^\d+-[A-Za-z0-9_.-]+$")


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


def _stable_id(kind: str, model_id: str, source_id: str, latent: int, rank: int = 0) -> str:
    """A 25-character cuid-like id (Neuronpedia's ids are cuids), stable across re-exports."""
    h = hashlib.sha256(f"mechscope|{kind}|{model_id}|{source_id}|{latent}|{rank}".encode()).hexdigest()
    return "c" + h[:24]


def _jsonl_gz(rows: list[dict]) -> bytes:
    data = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode("utf-8")
    return gzip.compress(data, compresslevel=5, mtime=0)


def _explanation_notes(explanations: Any) -> dict[int, str]:
    """latent -> the explanation's `source` (explainer name), when the objects carry one."""
    if explanations is None or isinstance(explanations, Mapping):
        return {}
    out = {}
    for e in explanations:
        src = e.get("source") if isinstance(e, Mapping) else getattr(e, "source", None)
        feat = e.get("feature") if isinstance(e, Mapping) else getattr(e, "feature", None)
        if src is not None and feat is not None:
            out[int(feat)] = str(src)
    return out


def neuronpedia_model_id(name: str) -> str:
    """A Neuronpedia model id for a model name: lowercase letters, digits, '-' and '.'."""
    return re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-") or "model"


def neuronpedia_source_id(hook: str, set_name: str = "mechscope") -> str:
    """Neuronpedia's source id '{layer}-{kind}-{set}' for a hook: blocks.7.hook_resid_post -> 7-res-mechscope."""
    layer, rest = split_hook_name(hook)
    if layer is None:
        return f"0-{neuronpedia_model_id(hook)}-{set_name}"
    kind = ("res" if "resid" in rest else "mlp" if "mlp" in rest else "att" if "attn" in rest
            else neuronpedia_model_id(rest))
    return f"{layer}-{kind}-{set_name}"


def export_neuronpedia(stats: Any, tokenizer: Any, out: str | Path, *, model_id: str, source_id: str,
                       explanations: Any = None, features: Any = None, max_features: int = 1_000_000,
                       batch_size: int = 1024, creator_id: str | None = None, explanation_type: str | None = None,
                       explanation_model: str | None = None, dataset: str | None = None) -> Path:
    """Write Neuronpedia import files for the latents of `stats` (default every live one, or `features`) under
    out/{model_id}/{source_id}/ and return that folder. source_id is Neuronpedia's "{layer}-{set name}",
    e.g. "15-res-mechscope". Files: source.jsonl, features/, activations/ and (with explanations)
    explanations/batch-N.jsonl.gz, `batch_size` features per batch."""
    if not isinstance(model_id, str) or not _MODEL_ID.match(model_id):
        raise InputError(f"model_id must be letters, digits, '-', '_' or '.' (Neuronpedia's model ids, e.g. "
                         f"'gpt2-small'), got {model_id!r}.")
    if not isinstance(source_id, str) or not _SOURCE_ID.match(source_id):
        raise InputError(f"source_id must be Neuronpedia's '{{layer}}-{{set name}}', e.g. '15-res-mechscope', "
                         f"got {source_id!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    rows = pick_rows(stats, features, max_features)
    expl = explanation_map(explanations)
    notes = _explanation_notes(explanations)
    settings = stats.meta.get("settings", {}) if isinstance(stats.meta, Mapping) else {}
    hook = settings.get("hook")
    folder = Path(out) / model_id / source_id
    try:
        for sub in ("features", "activations") + (("explanations",) if expl else ()):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputNotWritableError(f"Cannot create {str(folder)!r}: {e}. Choose a writable folder.") from e
    created = datetime.now(timezone.utc).isoformat()
    lat = stats.features.tolist()
    edges = stats.hist_edges.double()
    centres = (edges[:-1] * edges[1:]).sqrt().tolist()  # geometric centres of the log-spaced bins
    set_name = source_id.split("-", 1)[1]
    ctx_len = stats.top_tokens.shape[-1]
    desc = settings.get("stream")
    src = {"id": source_id, "modelId": model_id, "setName": set_name, "hasDashboards": True,
           "num_prompts": int(stats.n_contexts), "num_tokens_in_prompt": int(ctx_len),
           "dataset": dataset if dataset is not None else (json.dumps(desc, sort_keys=True) if desc else None),
           "creatorId": creator_id, "inferenceEnabled": False, "visibility": "PRIVATE",
           "notes": f"mechscope feature_stats over {int(stats.n_tokens)} tokens", "createdAt": created}
    _write(folder / "source.jsonl", (json.dumps(src, ensure_ascii=False) + "\n").encode("utf-8"))

    for b, s in enumerate(range(0, len(rows), batch_size)):
        part = rows[s : s + batch_size]
        R = torch.tensor(part, dtype=torch.long)
        tt, ta = stats.top_tokens[R], stats.top_acts[R]  # [n, k, T]
        logits = stats.logit_top_ids is not None and stats.logit_bottom_ids is not None
        ids = [tt.flatten()] + ([stats.logit_top_ids[R].flatten(), stats.logit_bottom_ids[R].flatten()]
                                if logits else [])
        u = torch.cat(ids).unique()
        text = token_texts(tokenizer, u[u >= 0].tolist())
        top_ctx, top_pos = stats.top_context[R].tolist(), stats.top_pos[R].tolist()
        tt_l, ta_l = tt.tolist(), ta.tolist()
        hist, count = stats.hist[R].tolist(), stats.count[R].tolist()
        act_max, density = stats.act_max[R].tolist(), stats.density[R].tolist()
        if logits:
            lt, ltv = stats.logit_top_ids[R].tolist(), stats.logit_top_values[R].tolist()
            lb, lbv = stats.logit_bottom_ids[R].tolist(), stats.logit_bottom_values[R].tolist()
        feats, acts, exps = [], [], []
        for i, r in enumerate(part):
            latent = lat[r]
            h = hist[i]
            nz = [j for j, c in enumerate(h) if c > 0]
            a, z = (nz[0], nz[-1] + 1) if nz else (0, 0)
            feats.append({
                "modelId": model_id, "layer": source_id, "index": str(latent), "creatorId": creator_id,
                "createdAt": created, "maxActApprox": _finite(act_max[i]), "hasVector": False, "vector": [],
                "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": hook,
                "topkCosSimIndices": [], "topkCosSimValues": [],
                "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
                "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
                "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
                "neg_str": [text.get(t, "") for t in lb[i]] if logits else [],
                "neg_values": [_finite(v) for v in lbv[i]] if logits else [],
                "pos_str": [text.get(t, "") for t in lt[i]] if logits else [],
                "pos_values": [_finite(v) for v in ltv[i]] if logits else [],
                "frac_nonzero": _finite(density[i]),
                "freq_hist_data_bar_heights": [float(c) for c in h[a:z]],
                "freq_hist_data_bar_values": [float(c) for c in centres[a:z]],
                "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
                "decoder_weights_dist": [],
            })
            for j, (ctx, pos) in enumerate(zip(top_ctx[i], top_pos[i])):
                if ctx < 0 or count[i] == 0:
                    continue
                keep = [p for p, t in enumerate(tt_l[i][j]) if t >= 0]
                vals = [_finite(ta_l[i][j][p]) for p in keep]
                toks = [text.get(tt_l[i][j][p], "") for p in keep]
                mx = max(vals)
                acts.append({
                    "id": _stable_id("act", model_id, source_id, latent, j), "tokens": toks, "index": str(latent),
                    "layer": source_id, "modelId": model_id, "maxValue": mx, "maxValueTokenIndex": vals.index(mx),
                    "minValue": min(vals), "values": vals, "creatorId": creator_id, "dataSource": None,
                    "dataIndex": str(ctx), "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,
                    "createdAt": created, "lossValues": [], "logitContributions": None, "binMin": -1.0,
                    "binMax": _finite(act_max[i]), "binContains": -1.0, "qualifyingTokenIndex": keep.index(pos)
                    if pos in keep else None,
                })
            if latent in expl:
                exps.append({
                    "id": _stable_id("expl", model_id, source_id, latent), "modelId": model_id, "layer": source_id,
                    "index": str(latent), "description": expl[latent], "authorId": creator_id,
                    "triggeredByUserId": None, "typeName": explanation_type, "explanationModelName": explanation_model,
                    "notes": notes.get(latent), "createdAt": created,
                })
        _write(folder / "features" / f"batch-{b}.jsonl.gz", _jsonl_gz(feats))
        _write(folder / "activations" / f"batch-{b}.jsonl.gz", _jsonl_gz(acts))
        if expl:
            _write(folder / "explanations" / f"batch-{b}.jsonl.gz", _jsonl_gz(exps))
    return folder


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise OutputNotWritableError(f"Cannot write {str(path)!r}: {e}. Choose a writable folder.") from e
