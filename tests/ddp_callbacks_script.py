"""Train with the unlearning callbacks under ``Trainer(strategy="ddp")`` on 2 CPU processes.

Run by ``tests/test_lightning_ddp.py`` as ``python tests/ddp_callbacks_script.py OUTDIR``.
Lightning's ``ddp`` strategy re-executes this same command line for rank 1 (that is why this is
a script and not a test function: under pytest, the launcher would re-run pytest). The ledger at
``OUTDIR/ledger.db`` must exist with pending requests; each rank saves its final weights and
training log to ``OUTDIR/rank{r}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from unlearn.data import load_digits
from unlearn.lightning import GradientRestrictionCallback, TrainingLogCallback, UnlearningCallback
from unlearn.removal import IAU
from unlearn.tasks import ClassificationTask

N = 600
BATCH = 64


class MLP(pl.LightningModule):
    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        _, x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class RankSnapshot(pl.Callback):
    """Saves each rank's weights and training log at the end of training."""

    def __init__(self, folder: Path, log: TrainingLogCallback) -> None:
        self.folder, self.training_log = folder, log

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"state": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                    "steps": [r.to_dict() for r in self.training_log.steps]},
                   self.folder / f"rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    digits = load_digits().subset(list(range(N)))
    log = TrainingLogCallback(every_n_steps=None)
    unlearning = UnlearningCallback(str(out / "ledger.db"),
                                    IAU(ClassificationTask(), step_scale=30.0),
                                    models=out / "models", train_dataset=digits)
    gr = GradientRestrictionCallback(0.01, log_name=None)  # double backprop through DDP
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False,
                         callbacks=[log, gr, unlearning, RankSnapshot(out, log)])
    trainer.fit(MLP(), DataLoader(digits, batch_size=BATCH // 2, shuffle=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
