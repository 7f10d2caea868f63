"""Black-box baselines the step model is compared with: the study's 3-coefficient
linear model, its per-experiment XGBoost (needs the ``xgboost`` extra), its features and
its own published predictions."""

from ._baselines import (
    STUDY_FEATURES as STUDY_FEATURES,
    BlackBox as BlackBox,
    XGBoostBaseline as XGBoostBaseline,
    load_study_xgboost as load_study_xgboost,
    study_features as study_features,
)
