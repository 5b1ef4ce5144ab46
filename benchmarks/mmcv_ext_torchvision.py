"""A stand-in for mmcv's compiled ops (``mmcv._ext``) on torchvision's,
for a GPU machine where mmcv is installed without them (mmcv-lite): what
mmdet's Mask R-CNN training step calls, NMS and RoIAlign (average
pooling), runs on ``torchvision.ops``; any other op raises when called.

Installed as ``mmcv/_ext.py`` next to an mmcv-lite install (see
benchmarks/gpu_wheels.sh). Timings taken with it say so
(``gpu_check.py`` records ``mmcv_ops``); the two detectors compared share
these kernels.
"""
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)

#: what gpu_check.py reports as the source of mmcv's ops
SOURCE = 'torchvision'


def nms(boxes, scores, iou_threshold: float, offset: int = 0):
    """Indices kept, by decreasing score (as mmcv's ``nms``)."""
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + offset], dim=1)
    return torch.ops.torchvision.nms(boxes, scores, float(iou_threshold))


def roi_align_forward(input, rois, output, argmax_y, argmax_x,
                      aligned_height: int, aligned_width: int,
                      spatial_scale: float, sampling_ratio: int,
                      pool_mode: int, aligned: bool) -> None:
    if pool_mode != 1:
        raise NotImplementedError('RoIAlign with max pooling is not '
                                  'available without mmcv\'s compiled ops')
    output.copy_(torch.ops.torchvision.roi_align(
        input, rois, float(spatial_scale), int(aligned_height),
        int(aligned_width), int(sampling_ratio), bool(aligned)))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input,
                       aligned_height: int, aligned_width: int,
                       spatial_scale: float, sampling_ratio: int,
                       pool_mode: int, aligned: bool) -> None:
    n, c, h, w = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, float(spatial_scale), int(aligned_height),
        int(aligned_width), n, c, h, w, int(sampling_ratio), bool(aligned)))


def __getattr__(name: str):
    if name.startswith('__'):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"mmcv op '{name}' is not available: mmcv was installed without "
            'its compiled ops and benchmarks/mmcv_ext_torchvision.py stands '
            'in for NMS and RoIAlign only')

    return unavailable
