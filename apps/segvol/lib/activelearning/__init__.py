"""Next-sample strategies for curators: each returns an image with no final label, from its scoring method."""
from .class_entropy import ClassEntropyStrategy
from .disagreement import DisagreementStrategy
from .fh_novelty import FHNoveltyStrategy
from .first import FirstStrategy
from .random_fg import RandomForegroundStrategy

__all__ = ["ClassEntropyStrategy", "DisagreementStrategy", "FHNoveltyStrategy", "FirstStrategy",
           "RandomForegroundStrategy"]
