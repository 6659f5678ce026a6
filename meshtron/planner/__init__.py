"""The planner: which mesh to run a model on a cluster, with predicted memory, step time and MFU.

`predict` prices one layout (cost_model.py, every formula with its source), `plan` enumerates and ranks
every legal layout (search.py), `get_profile` names the hardware (hardware.py; `cpu` is measured,
calibrate.py), report.py prints the answer. Pure Python: nothing here starts a rank.
"""
from meshtron.planner.cost_model import ParallelLayout, Prediction, predict, training_flops
from meshtron.planner.hardware import BUILTIN, HardwareError, HardwareProfile, get_profile
from meshtron.planner.search import Plan, PlanError, plan

__all__ = ["ParallelLayout", "Prediction", "predict", "training_flops", "BUILTIN", "HardwareError",
           "HardwareProfile", "get_profile", "Plan", "PlanError", "plan"]
