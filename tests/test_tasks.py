import pytest
import torch
from torch import nn

from unlearn.tasks import ClassificationTask, RegressionTask, Task


def test_classification_loss_matches_cross_entropy_per_sample():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    got = ClassificationTask().per_sample_loss(logits, y)
    want = torch.stack([nn.functional.cross_entropy(logits[i : i + 1], y[i : i + 1])
                        for i in range(5)])
    assert got.shape == (5,)
    torch.testing.assert_close(got, want)


def test_sequence_classification_sums_positions():
    logits, y = torch.randn(3, 6, 7), torch.randint(0, 6, (3, 7))
    got = ClassificationTask().per_sample_loss(logits, y)
    want = nn.functional.cross_entropy(logits, y, reduction="none").sum(dim=1)
    torch.testing.assert_close(got, want)


def test_regression_loss_is_half_squared_error():
    out, y = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(RegressionTask().per_sample_loss(out, y), torch.tensor([2.5, 1.0]))


def test_batches_with_and_without_ids():
    task, model = ClassificationTask(), nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    ids = torch.tensor([10, 11, 12, 13])
    torch.testing.assert_close(task.loss(model, (x, y)), task.loss(model, (ids, x, y)))
    assert task.batch_ids((ids, x, y)).tolist() == [10, 11, 12, 13]
    assert task.batch_ids((x, y)) is None
    with pytest.raises(ValueError, match="split_batch"):
        task.split_batch({"x": x})


def test_sampled_labels_follow_the_model_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(20000, 3)
    draws = ClassificationTask().sample_targets(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)

    out = torch.full((20000, 1), 3.0)
    y = RegressionTask().sample_targets(out, torch.Generator().manual_seed(0))
    assert abs(float(y.mean()) - 3.0) < 0.03 and abs(float(y.std()) - 1.0) < 0.03


def test_custom_task_and_errors():
    class Hinge(Task):
        def per_sample_loss(self, outputs, targets):
            margin = outputs.squeeze(-1) * (2 * targets.float() - 1)
            return nn.functional.softplus(1 - margin)

    loss = Hinge().loss(nn.Linear(2, 1), (torch.randn(4, 2), torch.tensor([0, 1, 1, 0])))
    assert loss.shape == (4,)
    with pytest.raises(NotImplementedError, match="sample targets"):
        Hinge().sample_targets(torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        ClassificationTask().per_sample_loss(torch.zeros(3), torch.zeros(3))
