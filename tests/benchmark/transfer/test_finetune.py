from __future__ import annotations

import pytest

from benchmark.transfer.finetune import detection_lr


def test_detectron2_warmup_multistep_by_hand():
    # WarmupMultiStepLR: factor = f*(1-a) + a with a = it/warmup, then x0.1 per passed step
    assert detection_lr(0, 0.02, 1000, 1e-3, [4000], 0.1) == pytest.approx(0.02 * 1e-3)
    assert detection_lr(500, 0.02, 1000, 1e-3, [4000], 0.1) == pytest.approx(
        0.02 * (1e-3 * 0.5 + 0.5)
    )
    assert detection_lr(1000, 0.02, 1000, 1e-3, [4000], 0.1) == pytest.approx(0.02)
    assert detection_lr(3999, 0.02, 1000, 1e-3, [4000], 0.1) == pytest.approx(0.02)
    assert detection_lr(4000, 0.02, 1000, 1e-3, [4000], 0.1) == pytest.approx(0.002)
    crag = [10000, 13000]
    assert detection_lr(13000, 0.02, 1000, 1e-3, crag, 0.1) == pytest.approx(0.0002)
