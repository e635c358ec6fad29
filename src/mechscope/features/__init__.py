"""Features you can read: statistics, explanations scored by detection, dashboards and queries of SAE /
transcoder latents (and of raw MLP neurons, the baseline)."""

from mechscope.features.dashboard import write_dashboards
from mechscope.features.detection import (
    DetectionScores,
    DetectionSet,
    LLMDetector,
    detection_windows,
    score_detection,
    term_detector,
)
from mechscope.features.explain import (
    Explanation,
    OpenAIExplainer,
    explain_llm,
    explain_offline,
    load_explanations,
    save_explanations,
    token_counts,
)
from mechscope.features.neuronpedia import export_neuronpedia
from mechscope.features.neurons import neuron_coder
from mechscope.features.pipeline import analyse_features, feature_dashboards, ranked_features
from mechscope.features.query import FeatureActivations, active_features, nearest_features, search_features
from mechscope.features.stats import FeatureStats, feature_stats, logit_effects
from mechscope.features.transcoder_stats import transcoder_feature_stats

__all__ = [
    "DetectionScores", "DetectionSet", "Explanation", "FeatureActivations", "FeatureStats", "LLMDetector",
    "OpenAIExplainer", "active_features", "analyse_features", "detection_windows", "explain_llm", "explain_offline",
    "export_neuronpedia", "feature_dashboards", "feature_stats", "load_explanations", "logit_effects",
    "nearest_features", "neuron_coder", "ranked_features", "save_explanations", "score_detection",
    "search_features", "term_detector", "token_counts", "transcoder_feature_stats", "write_dashboards",
]
