"""Scoring methods: each writes one per-image score into the datastore for its next-sample strategy."""
from .class_entropy import ClassEntropyScoring
from .disagreement import DisagreementScoring
from .fh_novelty import FHNoveltyScoring
from .foreground import ForegroundScoring

__all__ = ["ClassEntropyScoring", "DisagreementScoring", "FHNoveltyScoring", "ForegroundScoring"]
