"""Evaluation: pooled BiGR features and linear probes; FID / sFID / IS / precision-recall with a Flax FID Inception.

Entry points (`run.py`): `extract_features`, `probe_features`, `features_and_probe`, `evaluate_samples`, configured by
`config.evaluation` (`config_sections.EvaluationConfig` lists every field).
"""

from bigr_jax.evaluation.protocols import evaluate_samples
from bigr_jax.evaluation.protocols import evaluation_config
from bigr_jax.evaluation.protocols import extract_features
from bigr_jax.evaluation.protocols import features_and_probe
from bigr_jax.evaluation.protocols import probe_features
from bigr_jax.evaluation.protocols import refuse_finished_evaluation
