"""Checks every adapter must pass, shared by the per-family test files."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import qpert
from qpert.models.compiling import has_cpp_compiler

#: Boxes per image of a 3-image batch: several objects, one reaching outside the image, a tiny one.
BOXES = [
    [[10.0, 12.0, 60.0, 44.0], [0.0, 0.0, 22.0, 25.0], [70.0, 55.0, 118.0, 99.0]],
    [[30.0, 30.0, 90.0, 90.0]],
    [[-20.0, 5.0, 40.0, 140.0], [50.0, 50.0, 53.0, 52.0]],
]
SIZES = [(100, 120), (100, 100), (120, 80)]  # (height, width)

#: torch.compile generates C++; .ci/run installs g++, elsewhere these tests skip with this reason.
needs_cpp_compiler = pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile needs a C++ compiler (g++)")


def assert_detach_restores(model: torch.nn.Module, forward: Callable[[], torch.Tensor], boxes, sizes) -> None:
    """Attach, perturb, detach: no hook left, weights untouched, outputs bit-identical."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = forward()
    handle = qpert.attach(model)
    with handle.objects(boxes, sizes):
        assert not torch.equal(forward(), base), "Q-Pert must change the outputs, else the check is vacuous"
    handle.detach()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(forward(), base)


def assert_inactive_is_bit_identical(
    model: torch.nn.Module, forward: Callable[[], torch.Tensor], alpha: float, boxes_on_no_token=None
) -> None:
    """Outside objects(), with no boxes, for the box-less image of a batch, with boxes that cover no
    token (``boxes_on_no_token``, where a model crops or drops pixels) and with alpha = 0, outputs
    are bit-identical to the unmodified model; the other images of a mixed batch do change."""
    base = forward()
    handle = qpert.attach(model, qpert.QPertConfig(alpha=alpha))
    try:
        assert torch.equal(forward(), base)
        with handle.objects([[], None, np.zeros((0, 4))], SIZES):
            assert torch.equal(forward(), base)
        if boxes_on_no_token is not None:
            with handle.objects(boxes_on_no_token, SIZES):
                assert torch.equal(forward(), base)
        with handle.objects([BOXES[0], [], BOXES[2]], SIZES):
            mixed = forward()
        assert torch.equal(mixed[1], base[1]) and (mixed[0] - base[0]).abs().max() > 1e-3
        handle.config = qpert.QPertConfig(alpha=0.0)
        with handle.objects(BOXES, SIZES):
            assert torch.equal(forward(), base)
    finally:
        handle.detach()


def assert_matches_reference(
    model: torch.nn.Module,
    forward: Callable[[], torch.Tensor],
    install_reference: Callable[[], object],
    config: dict,
    boxes=BOXES,
    sizes=SIZES,
) -> qpert.QPertHandle:
    """The adapter's outputs equal (<= 1e-5) those of a plain reference of DESIGN.md §1 hooked into the
    same modules (``install_reference()`` returns it, with ``remove()``), and the reference does change
    the outputs. Returns the (detached) handle, for checks of its layout."""
    base = forward()
    reference = install_reference()
    try:
        expected = forward()
    finally:
        reference.remove()
    assert (expected - base).abs().max() > 1e-3, "the reference must change the outputs, else the test is vacuous"
    handle = qpert.attach(model, qpert.QPertConfig(**config))
    try:
        with handle.objects(boxes, sizes):
            got = forward()
    finally:
        handle.detach()
    assert (got - expected).abs().max() <= 1e-5
    return handle
