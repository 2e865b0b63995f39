"""Paired studies: problems and grading, named conditions, the resumable results file,
`evaluate` / `ablate`, and the `StudyResult` with its statistics and report; the
validation study (`validate`, docs/validation.md); Step-Saliency of a trace file
(`saliency_maps`). Every run that writes results goes through the job runner (`jobs`)."""

from .conditions import ABLATION, CONDITIONS, DEFAULT_CONDITIONS
from .grading import Grade, extract_answer, grade
from .problems import Problem, SuiteConfig, builtin_suite, load_problems, prompt_for
from .resampling import ResamplingResult, load_resampling, resampling_importance
from .result import StudyResult
from .run import ablate, evaluate, load_study
from .saliency_maps import SaliencyMaps, load_saliency_maps, saliency_maps
from .validate import (
    VALIDATION_CONDITIONS,
    StepKnockout,
    ValidationConfig,
    ValidationResult,
    knockout_matrix,
    load_validation,
    validate,
)

__all__ = [
    "ABLATION", "CONDITIONS", "DEFAULT_CONDITIONS", "Grade", "Problem", "StudyResult", "SuiteConfig", "ablate",
    "builtin_suite", "evaluate", "extract_answer", "grade", "load_problems", "load_study", "prompt_for",
    "VALIDATION_CONDITIONS", "StepKnockout", "ValidationConfig", "ValidationResult", "knockout_matrix",
    "load_validation", "validate", "ResamplingResult", "load_resampling", "resampling_importance",
    "SaliencyMaps", "load_saliency_maps", "saliency_maps",
]
