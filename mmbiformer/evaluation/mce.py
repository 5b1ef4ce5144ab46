"""ImageNet-C metrics: top-1 error per corruption and severity, corruption
errors normalised by AlexNet's, the mean corruption error (mCE).

Definitions (Hendrycks and Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR 2019): with
``E[c, s]`` a model's top-1 error on corruption ``c`` at severity ``s``,

* the corruption error ``CE[c] = sum_s E[c, s] / sum_s E_AlexNet[c, s]``,
  here ``mean_s E[c, s] / ALEXNET_ERRORS[c]`` (the table holds AlexNet's
  error averaged over the 5 severities);
* ``mCE`` = the mean of ``CE[c]`` over the 15 benchmark corruptions;
* the unnormalised mean error = the mean of ``E[c, s]`` over the 15
  corruptions and 5 severities.

The 4 extra corruptions are reported apart (error per severity and mean)
and are not part of the mCE. An mCE is only reported when every benchmark
corruption has all 5 severities; otherwise the metric warns, naming what is
missing, and reports the per-corruption numbers only.
"""
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger

from ..datasets.imagenet_c import (
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
)

__all__ = ['ALEXNET_ERRORS', 'ImageNetCMetric', 'corruption_summary']

#: AlexNet's top-1 error on each benchmark corruption, averaged over the 5
#: severities: the published normalisers of the mCE (Hendrycks and
#: Dietterich, ICLR 2019; the values of the authors' evaluation code in
#: github.com/hendrycks/robustness, ImageNet-C/test.py)
ALEXNET_ERRORS = {
    'gaussian_noise': 0.886428,
    'shot_noise': 0.894468,
    'impulse_noise': 0.922640,
    'defocus_blur': 0.819880,
    'glass_blur': 0.826268,
    'motion_blur': 0.785948,
    'zoom_blur': 0.798360,
    'snow': 0.866816,
    'frost': 0.826572,
    'fog': 0.819324,
    'brightness': 0.564592,
    'contrast': 0.853204,
    'elastic_transform': 0.646056,
    'pixelate': 0.717840,
    'jpeg_compression': 0.606500,
}


def corruption_summary(counts: Dict[tuple, List[int]]) -> dict:
    """Errors, CEs and mCE from ``{(corruption, severity): [wrong, total]}``.

    Returns:
        dict: ``errors`` ``{corruption: {severity: error}}`` (fractions),
        ``mean_errors`` ``{corruption: mean over its severities}``, ``ce``
        ``{benchmark corruption with 5 severities: CE}``, ``mce`` and
        ``mean_error`` (None unless all 15 benchmark corruptions have all 5
        severities), ``extra_mean_error`` (None unless the 4 extras are
        complete) and ``incomplete`` (the benchmark
        ``corruption/severity`` pairs that are missing).
    """
    errors: Dict[str, Dict[int, float]] = defaultdict(dict)
    for (corruption, severity), (wrong, total) in counts.items():
        if total:
            errors[corruption][int(severity)] = wrong / total
    mean_errors = {c: sum(e.values()) / len(e) for c, e in errors.items()}
    complete = {c for c, e in errors.items()
                if set(e) >= set(SEVERITIES)}
    ce = {c: mean_errors[c] / ALEXNET_ERRORS[c]
          for c in BENCHMARK_CORRUPTIONS if c in complete}
    incomplete = [f'{c}/{s}' for c in BENCHMARK_CORRUPTIONS
                  for s in SEVERITIES if s not in errors.get(c, {})]
    mce = mean_error = extra_mean = None
    if not incomplete:
        mce = sum(ce.values()) / len(ce)
        mean_error = sum(mean_errors[c] for c in BENCHMARK_CORRUPTIONS) / \
            len(BENCHMARK_CORRUPTIONS)
    if all(c in complete for c in EXTRA_CORRUPTIONS):
        extra_mean = sum(mean_errors[c] for c in EXTRA_CORRUPTIONS) / \
            len(EXTRA_CORRUPTIONS)
    return dict(errors=dict(errors), mean_errors=mean_errors, ce=ce,
                mce=mce, mean_error=mean_error, extra_mean_error=extra_mean,
                incomplete=incomplete)


def format_table(summary: dict) -> str:
    """A plain-text table: one row per corruption with its top-1 error (%)
    at each severity, the mean and the CE (%), then the mCE rows."""
    head = (f'{"corruption":<20}' + ''.join(f'{f"s{s}":>7}'
                                            for s in SEVERITIES)
            + f'{"mean":>8}{"CE":>8}')
    lines = [head, '-' * len(head)]

    def row(c: str) -> str:
        errs = summary['errors'].get(c, {})
        cells = ''.join(f'{100 * errs[s]:>7.2f}' if s in errs else
                        f'{"-":>7}' for s in SEVERITIES)
        mean = summary['mean_errors'].get(c)
        ce = summary['ce'].get(c)
        return (f'{c:<20}{cells}'
                + (f'{100 * mean:>8.2f}' if mean is not None else
                   f'{"-":>8}')
                + (f'{100 * ce:>8.2f}' if ce is not None else f'{"-":>8}'))

    for c in BENCHMARK_CORRUPTIONS:
        lines.append(row(c))
    lines.append('-' * len(head))
    if summary['mce'] is not None:
        lines.append(f'{"mCE (15, AlexNet = 100)":<55}'
                     f'{100 * summary["mce"]:>8.2f}')
        lines.append(f'{"mean top-1 error (15 x 5)":<55}'
                     f'{100 * summary["mean_error"]:>8.2f}')
    else:
        lines.append(f'no mCE: {len(summary["incomplete"])} benchmark '
                     'corruption/severity sets missing: '
                     + ', '.join(summary['incomplete'][:8])
                     + (' ...' if len(summary['incomplete']) > 8 else ''))
    extras = [c for c in EXTRA_CORRUPTIONS if c in summary['errors']]
    if extras:
        lines.append('extra corruptions (held out, not in the mCE):')
        lines.extend(row(c) for c in extras)
    return '\n'.join(lines)


class ImageNetCMetric(BaseMetric):
    """Top-1 errors per corruption and severity, CE per corruption, mCE and
    the unnormalised mean error on :class:`~mmbiformer.datasets.ImageNetC`.

    The samples must carry ``corruption`` and ``severity`` in their meta
    information (the dataset provides them; keep them with
    ``PackInputs(meta_keys=(..., 'corruption', 'severity'))``).

    Metrics (percent, under the prefix ``imagenet-c``): ``mCE`` and
    ``mean_error`` (only for the complete 15 x 5 set), ``CE/<corruption>``,
    ``error/<corruption>`` (mean over severities) and
    ``error/<corruption>/<severity>``; the extras under ``extra/``. The
    table (:attr:`table`) is logged.
    """

    default_prefix = 'imagenet-c'

    def __init__(self, collect_device: str = 'cpu',
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        #: the text table of the last evaluation
        self.table: str = ''
        #: the summary of the last evaluation (see corruption_summary)
        self.summary: dict = {}

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            if 'corruption' not in sample or 'severity' not in sample:
                raise KeyError(
                    'ImageNetCMetric needs the corruption and severity of '
                    "each sample: use dataset type 'ImageNetC' and keep "
                    "them with PackInputs(meta_keys=(..., 'corruption', "
                    "'severity'))")
            if 'pred_score' in sample:
                pred = int(torch.as_tensor(sample['pred_score']).argmax())
            else:
                pred = int(torch.as_tensor(sample['pred_label']).view(-1)[0])
            gt = int(torch.as_tensor(sample['gt_label']).view(-1)[0])
            self.results.append((sample['corruption'],
                                 int(sample['severity']), int(pred != gt)))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        counts: Dict[tuple, List[int]] = defaultdict(lambda: [0, 0])
        for corruption, severity, wrong in results:
            counts[(corruption, severity)][0] += wrong
            counts[(corruption, severity)][1] += 1
        summary = corruption_summary(counts)
        self.summary = summary
        self.table = format_table(summary)
        logger = MMLogger.get_current_instance()
        logger.info('ImageNet-C top-1 error (%):\n' + self.table)
        if summary['incomplete']:
            logger.warning(
                'ImageNet-C: no mCE, the benchmark set is incomplete; '
                f'missing {", ".join(summary["incomplete"])}')
        metrics = {}
        if summary['mce'] is not None:
            metrics['mCE'] = 100 * summary['mce']
            metrics['mean_error'] = 100 * summary['mean_error']
        for c, value in summary['ce'].items():
            metrics[f'CE/{c}'] = 100 * value
        for c, errs in summary['errors'].items():
            group = 'extra/' if c in EXTRA_CORRUPTIONS else ''
            metrics[f'{group}error/{c}'] = 100 * summary['mean_errors'][c]
            for s, e in sorted(errs.items()):
                metrics[f'{group}error/{c}/{s}'] = 100 * e
        if summary['extra_mean_error'] is not None:
            metrics['extra/mean_error'] = 100 * summary['extra_mean_error']
        return metrics
