"""Sample-quality metrics: FID / KID with the standard TorchScript Inception, CLIP score, per-level FID and
cross-level consistency of generated pyramids (and temporal consistency of clips), the shapes and motion oracles,
and `evaluate_model` (behind `mdm eval`)."""

from mdm.eval.accumulate import FeatureAccumulator, RunningMean, rank_batches
from mdm.eval.clip_score import ClipScorer, load_clip
from mdm.eval.evaluate import (
    EvalReport,
    LevelResult,
    PyramidEvaluator,
    evaluate_model,
    format_table,
    item_latents,
    sample_latents,
)
from mdm.eval.features import (
    INCEPTION_ENV,
    INCEPTION_SHA256,
    INCEPTION_URL,
    FeatureExtractor,
    InceptionFeatures,
    inception_path,
    load_inception,
)
from mdm.eval.frechet import Statistics, frechet_distance
from mdm.eval.kid import kid
from mdm.eval.levels import consistency_mse, pool_levels, psnr
from mdm.eval.oracle import (
    ORACLE_CACHE_ENV,
    LabelBreakdown,
    Oracle,
    OracleEvaluator,
    OracleResult,
    OracleSpec,
    load_or_train_oracle,
    train_oracle,
)

__all__ = [
    "INCEPTION_ENV",
    "INCEPTION_SHA256",
    "INCEPTION_URL",
    "ORACLE_CACHE_ENV",
    "ClipScorer",
    "EvalReport",
    "FeatureAccumulator",
    "FeatureExtractor",
    "InceptionFeatures",
    "LabelBreakdown",
    "LevelResult",
    "Oracle",
    "OracleEvaluator",
    "OracleResult",
    "OracleSpec",
    "PyramidEvaluator",
    "RunningMean",
    "Statistics",
    "consistency_mse",
    "evaluate_model",
    "format_table",
    "frechet_distance",
    "inception_path",
    "item_latents",
    "kid",
    "load_clip",
    "load_inception",
    "load_or_train_oracle",
    "pool_levels",
    "psnr",
    "rank_batches",
    "sample_latents",
    "train_oracle",
]
