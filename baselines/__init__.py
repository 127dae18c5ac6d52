"""Baselines every removal is compared with, all on the removal protocol
``Method(task, ...).unlearn(model, forget=..., retain=...) -> RemovalResult``.

* :class:`Retrain` — exact retraining from scratch on the retained data (the gold reference);
* :class:`FineTune` — a few epochs on the retained data;
* :class:`NegGrad`, :class:`NegGradPlus` — gradient ascent on the forget loss (+ retain descent);
* :class:`SCRUB` — teacher-student max/min distillation (Kurmanji et al. 2023);
* :class:`SalUn` — saliency-masked random-label fine-tuning (Fan et al. 2024);
* :class:`FisherForgetting` — inverse-Fisher Gaussian noise (Golatkar et al. 2020);
* :class:`RandomLabel` — fine-tuning with random wrong labels on the forget set;
* :class:`SISA` — sharded, sliced training that retrains only affected shards
  (Bourtoule et al. 2021).
"""

from baselines.finetune import FineTune
from baselines.fisher import FisherForgetting
from baselines.neggrad import NegGrad, NegGradPlus
from baselines.random_label import RandomLabel
from baselines.retrain import Recipe, Retrain
from baselines.salun import SalUn
from baselines.scrub import SCRUB
from baselines.sisa import SISA, SISAEnsemble

__all__ = ["FineTune", "FisherForgetting", "NegGrad", "NegGradPlus", "RandomLabel", "Recipe",
           "Retrain", "SCRUB", "SISA", "SISAEnsemble", "SalUn"]
