"""Interventions, as users import them: `from mechscope.interventions import Add, Ablate, ...`.

The implementation lives with the model (models/interventions.py) because every stage of the forward
publishes the run state they read; steering, feature clamping, editing and monitors build on these classes."""

from mechscope.models.interventions import (
    Ablate,
    Add,
    Apply,
    Intervention,
    Positions,
    Scale,
    Set,
    check_interventions,
    head_dim,
    position_dim,
    select_positions,
)

__all__ = ["Ablate", "Add", "Apply", "Intervention", "Positions", "Scale", "Set", "check_interventions", "head_dim",
           "position_dim", "select_positions"]
