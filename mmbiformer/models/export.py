"""Export the BiFormer backbone with ``torch.export`` and to ONNX.

Used by ``tools/deployment/export.py``. Two kinds of export:

* static (default): the graph is traced at one input size and only accepts
  that size (and batch size);
* dynamic (``dynamic=True``): batch, height and width are symbolic, so one
  exported program (or ONNX graph) serves many sizes. This needs
  ``auto_pad=True`` (set on the backbone here): while exporting, every
  routing attention pads its map to the region grid and crops back
  unconditionally (possibly by zero), so the graph holds no branch on the
  input size. The attention is one node of the registered operator
  (``mmbiformer::bra_forward``), whose fake implementation handles symbolic
  sizes; loading a saved program needs ``import mmbiformer`` first, which
  registers it.

  ``torch.export`` specialises a size of 1 (a region of one token per side
  has other strides), so the exported program accepts inputs whose every
  routing stage has regions of at least 2 tokens per side: sides of at
  least :func:`min_dynamic_side` (113 with ``n_win=7``: 7 regions x stride
  16 of the third stage, plus one) and it raises ("Guard failed") on
  smaller ones; the example size must satisfy this too. The ONNX graph
  converted from it has no such checks and was verified to match eager on
  smaller inputs too (down to 32x32), but verify the sizes you deploy at
  (``tools/deployment/export.py --verify-shape``).

ONNX export goes through ``torch.onnx.export(..., dynamo=True)`` and needs
the ``onnx`` and ``onnxscript`` packages; verification uses
``onnxruntime``. ONNX has no BRA operator, so ONNX exports take the
``'official'`` backend (plain torch ops, the same function) unless another
is asked for.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..ops import BiLevelRoutingAttention

__all__ = [
    'describe_ranges', 'export_backbone', 'max_abs_diff', 'min_dynamic_side',
    'prepare_for_export', 'run_exported', 'save_exported'
]

#: input name in exported ONNX graphs (the outputs are ``feat{i}`` for
#: stage ``i``)
INPUT_NAME = 'input'


def prepare_for_export(backbone: nn.Module,
                       dynamic: bool = False,
                       backend: Optional[str] = None,
                       fmt: str = 'torch') -> Dict[str, object]:
    """Put ``backbone`` in eval mode and choose its export settings.

    Args:
        backbone: a :class:`~.BiFormer`.
        dynamic: prepare for a dynamic-shape export: turn on ``auto_pad``.
        backend: attention backend to export with (default: keep the
            backbone's; for ONNX one of plain torch ops, ``'official'``).
        fmt: ``'torch'`` (``torch.export``) or ``'onnx'``.

    Returns:
        dict: what was changed (``auto_pad``, ``backend``: new values or
        None when unchanged), for the caller to report.
    """
    backbone.eval()
    changed: Dict[str, object] = dict(auto_pad=None, backend=None)
    attns = [
        m for m in backbone.modules()
        if isinstance(m, BiLevelRoutingAttention)
    ]
    if dynamic and attns and not all(m.auto_pad for m in attns):
        for m in attns:
            m.auto_pad = True
        if hasattr(backbone, 'auto_pad'):
            backbone.auto_pad = True
        changed['auto_pad'] = True
    current = attns[0].backend if attns else None
    if backend is None and fmt == 'onnx' and \
            current not in ('official', 'reference'):
        backend = 'official'
    if backend is not None and attns and backend != current:
        backbone.attn_backend = backend
        changed['backend'] = backend
    return changed


def min_dynamic_side(backbone: nn.Module) -> int:
    """Smallest input side a dynamic ``torch.export`` program of
    ``backbone`` accepts: every routing stage's regions must have at least
    2 tokens per side (1 if the backbone has no routing stage)."""
    topks = getattr(backbone, 'arch_settings', {}).get('topks', [])
    stages = [i for i, k in enumerate(topks) if k > 0]
    if not stages:
        return 1
    return backbone.n_win * 2**(max(stages) + 2) + 1


def export_backbone(backbone: nn.Module,
                    height: int,
                    width: int,
                    batch: int = 1,
                    dynamic: bool = False,
                    in_channels: Optional[int] = None
                    ) -> torch.export.ExportedProgram:
    """``torch.export`` the backbone on a random ``(batch, C, H, W)`` input.

    With ``dynamic=True`` the batch (any size >= 1), height and width are
    symbolic; the example batch is then at least 2 (``torch.export``
    specialises examples of size 0 and 1). Call :func:`prepare_for_export`
    first.
    """
    channels = in_channels or getattr(backbone, 'in_channels', 3)
    if dynamic:
        batch = max(batch, 2)
        side = min_dynamic_side(backbone)
        if min(height, width) < side:
            raise ValueError(
                f'a dynamic export needs an example of at least {side}x{side}'
                f' (every routing stage with regions of 2+ tokens per side; '
                f'n_win={backbone.n_win}), got {height}x{width}: the program '
                f'would only accept sizes close to it')
    x = torch.randn(batch, channels, height, width)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        dynamic_shapes = ({
            0: dim('batch', min=1),
            2: dim.DYNAMIC,
            3: dim.DYNAMIC
        }, )
    with torch.no_grad():
        return torch.export.export(
            backbone, (x, ), dynamic_shapes=dynamic_shapes)


def describe_ranges(program: torch.export.ExportedProgram) -> str:
    """The input sizes an exported program accepts, e.g. ``'batch >= 1,
    height >= 33, width >= 113'`` (``'static'`` without symbolic sizes)."""
    inputs = [n for n in program.graph.nodes if n.op == 'placeholder'
              and n.name in program.graph_signature.user_inputs]
    if not inputs:
        return 'static'
    parts = []
    shape = inputs[0].meta['val'].shape
    for name, size in zip(('batch', 'channels', 'height', 'width'), shape):
        if not isinstance(size, torch.SymInt):
            continue
        vr = program.range_constraints.get(size.node.expr)
        if vr is None:
            parts.append(f'{name} any')
            continue
        lower, upper = int(vr.lower), str(vr.upper)
        if 'oo' in upper:  # sympy's / torch's infinity
            parts.append(f'{name} >= {lower}')
        else:
            parts.append(f'{lower} <= {name} <= {upper}')
    return ', '.join(parts) or 'static'


def output_names(backbone: nn.Module) -> List[str]:
    """``feat{i}`` for each stage in the backbone's ``out_indices``."""
    indices = getattr(backbone, 'out_indices', None)
    if indices is None:
        return []
    return [f'feat{i}' for i in indices]


def save_exported(program: torch.export.ExportedProgram, path: str,
                  fmt: str, backbone: Optional[nn.Module] = None,
                  opset: int = 18) -> str:
    """Write ``program`` as ``fmt`` ``'torch'`` (``torch.export.save``,
    ``.pt2``) or ``'onnx'`` (one self-contained ``.onnx`` file)."""
    if fmt == 'torch':
        torch.export.save(program, path)
        return path
    if fmt != 'onnx':
        raise ValueError(f"format must be 'torch' or 'onnx', got {fmt!r}")
    try:
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            'ONNX export needs the onnx and onnxscript packages (pip install '
            'onnx onnxscript); --format torch needs neither') from err
    names = output_names(backbone) if backbone is not None else None
    torch.onnx.export(
        program,
        f=path,
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=names or None,
        external_data=False,
        verbose=False)
    return path


def run_exported(path: str, fmt: str,
                 x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Outputs of an exported file on ``x`` (ONNX through onnxruntime)."""
    if fmt == 'torch':
        program = torch.export.load(path)
        with torch.no_grad():
            return tuple(program.module()(x))
    import onnxruntime as ort
    session = _onnx_session(path, ort)
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return tuple(torch.from_numpy(o) for o in outs)


_SESSIONS: Dict[str, object] = {}


def _onnx_session(path: str, ort):
    import os
    key = f'{path}:{os.path.getmtime(path)}'
    if key not in _SESSIONS:
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        _SESSIONS.clear()
        _SESSIONS[key] = ort.InferenceSession(
            path, options, providers=['CPUExecutionProvider'])
    return _SESSIONS[key]


def max_abs_diff(expected: Sequence[torch.Tensor],
                 actual: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference over all outputs (inf on a shape or
    count mismatch)."""
    if len(expected) != len(actual):
        return float('inf')
    worst = 0.
    for e, a in zip(expected, actual):
        if tuple(e.shape) != tuple(a.shape):
            return float('inf')
        worst = max(worst, (e.float() - a.float()).abs().max().item()
                    if e.numel() else 0.)
    return worst
