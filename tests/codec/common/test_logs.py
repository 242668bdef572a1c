import pytest
import torch

from codec.common.logs import IntervalMeans, append_history, read_history, truncate_history


def test_truncating_a_history_keeps_the_records_up_to_the_checkpoints_step(tmp_path):
    """Logged to step 75 with a checkpoint at 50: a resume from 50 drops 60 and 75 (it logs them again); both
    records at step 50 (a training log and a validation) stay, and a history with nothing later is left alone."""
    for step in (25, 50, 50, 60, 75):
        append_history(tmp_path, {"step": step, "loss": 1.0})
    truncate_history(tmp_path, 50)
    assert [r["step"] for r in read_history(tmp_path)] == [25, 50, 50]
    truncate_history(tmp_path, 100)
    assert [r["step"] for r in read_history(tmp_path)] == [25, 50, 50]
    truncate_history(tmp_path / "none", 10)  # no history yet: nothing to do
    assert read_history(tmp_path / "none") == []


def test_interval_means_average_every_batch_since_the_last_log_then_start_again():
    means = IntervalMeans()
    for loss, kl in ((1.0, 10.0), (2.0, 20.0), (6.0, 60.0)):
        means.add({"loss": torch.tensor(loss), "kl": torch.tensor(kl, dtype=torch.bfloat16)})
    halved = means.means(lambda sums: sums / 2)  # the processes' reduction is applied to the means
    assert halved == {"loss": pytest.approx(1.5), "kl": pytest.approx(15.0)}
    means.add({"loss": torch.tensor(4.0), "kl": torch.tensor(0.0)})
    assert means.means(lambda sums: sums) == {"loss": 4.0, "kl": 0.0}
    with pytest.raises(RuntimeError, match="nothing was added"):
        means.means(lambda sums: sums)
