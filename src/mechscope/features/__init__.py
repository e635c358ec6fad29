"""Features you can read: per-feature statistics, top examples and logit effects of SAE/transcoder latents."""

from mechscope.features.stats import FeatureStats, feature_stats, logit_effects

__all__ = ["FeatureStats", "feature_stats", "logit_effects"]
