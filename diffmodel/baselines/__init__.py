"""Baselines the step model is compared with: the study's 3-coefficient linear model,
its per-experiment XGBoost (needs the ``xgboost`` extra), its features, its own
published predictions and its scipy fitter (``scipy``, in the ``app`` extra); and the
field's table-lookup estimator, aiconfigurator-core's per-step latency (needs the
``aic`` extra)."""

from ._aiconfigurator import aiconfigurator_step_us as aiconfigurator_step_us
from ._baselines import (
    STUDY_FEATURES as STUDY_FEATURES,
    BlackBox as BlackBox,
    XGBoostBaseline as XGBoostBaseline,
    load_study_xgboost as load_study_xgboost,
    study_features as study_features,
)
from ._study_scipy import (
    StudyLeastSquares as StudyLeastSquares,
    study_least_squares as study_least_squares,
)
