"""Evaluation on ImageNet val and ImageNet-ReaL, shared by pace-eval and the Trainer.

`evaluate(model, loader, ...)` runs a model over keyed samples on every rank, gathers the predictions and scores
them by sample key against the samples' labels and any label sets (ImageNet-ReaL); `build_evaluators` opens the
evaluators declared in the `eval` config group; `load_model` builds a model from any supported source.
"""

from pace.eval.classify import EvalResult, evaluate, predict
from pace.eval.config import EvaluatorConfig, evaluators_from_config
from pace.eval.datasets import EvalData
from pace.eval.evaluators import Evaluator, build_evaluators
from pace.eval.labels import LabelSets
from pace.eval.loading import LoadedModel, load_model, read_weights
from pace.eval.predictions import Predictions, read_predictions, write_predictions
from pace.eval.rescore import rescore
from pace.eval.transform import eval_data_config, run_eval_settings, set_eval_settings

__all__ = [
    "EvalData",
    "EvalResult",
    "Evaluator",
    "EvaluatorConfig",
    "LabelSets",
    "LoadedModel",
    "Predictions",
    "build_evaluators",
    "eval_data_config",
    "evaluate",
    "evaluators_from_config",
    "load_model",
    "read_weights",
    "predict",
    "read_predictions",
    "rescore",
    "run_eval_settings",
    "set_eval_settings",
    "write_predictions",
]
