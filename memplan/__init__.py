"""memplan: plan, measure and prove the accelerator memory of training jobs.

The analytic core (this package outside ``nn`` and ``profile``) imports no torch.
"""

from memplan.planner import Breakdown, FitResult, fits, max_batch, plan
from memplan.spec import LoraSpec, ModelSpec, TrainSpec

__all__ = ["Breakdown", "FitResult", "LoraSpec", "ModelSpec", "TrainSpec", "fits", "max_batch",
           "plan"]
__version__ = "0.2.0"
