"""The ImageNet-C metric on hand-made predictions, with exact numbers."""
import pytest

pytest.importorskip('mmpretrain')

from mmbiformer.datasets.imagenet_c import (  # noqa: E402
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
)
from mmbiformer.evaluation import (  # noqa: E402
    ALEXNET_ERRORS,
    ImageNetCMetric,
    corruption_summary,
)


def samples(corruption: str, severity: int, wrong: int, total: int = 10):
    """``total`` predictions of which the first ``wrong`` are wrong."""
    return [dict(corruption=corruption, severity=severity, gt_label=1,
                 pred_label=0 if i < wrong else 1) for i in range(total)]


def hand_made(skip=()):
    """Every corruption at 50 % error, except gaussian_noise at 10, 20, 30,
    40 and 50 % over the severities (mean 30 %); the extras at 70 %."""
    data = []
    for c in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS:
        for s in SEVERITIES:
            if (c, s) in skip:
                continue
            if c == 'gaussian_noise':
                wrong = s
            else:
                wrong = 7 if c in EXTRA_CORRUPTIONS else 5
            data += samples(c, s, wrong)
    return data


def evaluate(data):
    metric = ImageNetCMetric()
    for i in range(0, len(data), 7):  # batches of any size
        metric.process(None, data[i:i + 7])
    return metric, metric.compute_metrics(metric.results)


def test_alexnet_table():
    assert list(ALEXNET_ERRORS) == list(BENCHMARK_CORRUPTIONS)
    assert ALEXNET_ERRORS['gaussian_noise'] == 0.886428
    assert ALEXNET_ERRORS['jpeg_compression'] == 0.606500


def test_errors_ce_and_mce_exact():
    metric, out = evaluate(hand_made())
    assert out['error/gaussian_noise/1'] == pytest.approx(10.0)
    assert out['error/gaussian_noise/5'] == pytest.approx(50.0)
    assert out['error/gaussian_noise'] == pytest.approx(30.0)
    # CE = mean error / AlexNet's mean error
    assert out['CE/gaussian_noise'] == pytest.approx(33.84369627313217)
    assert out['CE/brightness'] == pytest.approx(88.55952617111117)
    assert out['CE/jpeg_compression'] == pytest.approx(50 / 0.6065)
    assert out['mCE'] == pytest.approx(63.168408720387546)
    assert out['mean_error'] == pytest.approx(48.666666666666664)
    # the extras are apart and not in the mCE
    assert out['extra/error/spatter'] == pytest.approx(70.0)
    assert out['extra/mean_error'] == pytest.approx(70.0)
    assert 'CE/spatter' not in out
    assert 'mCE (15, AlexNet = 100)' in metric.table
    assert 'extra corruptions' in metric.table


def test_partial_set_gives_no_mce(caplog):
    metric, out = evaluate(hand_made(skip={('fog', 3)}))
    assert 'mCE' not in out and 'mean_error' not in out
    assert 'CE/fog' not in out
    assert out['CE/gaussian_noise'] == pytest.approx(33.84369627313217)
    assert 'no mCE' in metric.table and 'fog/3' in metric.table
    assert metric.summary['incomplete'] == ['fog/3']


def test_summary_from_counts():
    counts = {(c, s): [1, 4] for c in BENCHMARK_CORRUPTIONS
              for s in SEVERITIES}
    summary = corruption_summary(counts)
    assert summary['mean_error'] == pytest.approx(0.25)
    assert summary['mce'] == pytest.approx(
        sum(0.25 / a for a in ALEXNET_ERRORS.values()) / 15)


def test_missing_meta_keys_are_named():
    metric = ImageNetCMetric()
    with pytest.raises(KeyError, match='corruption and severity'):
        metric.process(None, [dict(gt_label=1, pred_label=1)])
