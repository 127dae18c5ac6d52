"""Lightning callbacks: add unlearning to an existing ``Trainer`` without changing the module.

* :class:`TrainingLogCallback`: per-step sample ids, learning rates and checkpoints (what
  replay-based removal, SGD-influence and TracIn need).
* :class:`GradientRestrictionCallback`: IAU's gradient-restriction loss (double backprop).
* :class:`InfluenceCallback`: fit an influence estimator at the end of fit, save its factors,
  report the most self-influential (suspicious) training ids.
* :class:`UnlearningCallback`: apply the ledger's pending deletion requests with a removal
  method at the end of fit, every N epochs, or on an explicit call.
* :class:`CertificationCallback`: after each unlearning round, certify the model against
  references retrained without the forgotten data (cached), write ``certificate.json`` and
  ``report.html``, and move the requests to ``certified`` when it passes.

Every callback has ``state_dict`` / ``load_state_dict``, so a run checkpointed with Lightning's
``ModelCheckpoint`` and resumed with ``ckpt_path=`` ends with the same callback state.
"""

from unlearn.lightning.certification import CertificationCallback, CertificationRecord
from unlearn.lightning.gradient_restriction import GradientRestrictionCallback
from unlearn.lightning.influence import InfluenceCallback
from unlearn.lightning.training_log import StepRecord, TrainingLogCallback
from unlearn.lightning.unlearning import ProcessReport, UnlearningCallback

__all__ = [
    "CertificationCallback",
    "CertificationRecord",
    "GradientRestrictionCallback",
    "InfluenceCallback",
    "ProcessReport",
    "StepRecord",
    "TrainingLogCallback",
    "UnlearningCallback",
]
