"""fastdiff.compat._slots.SlotMirror: the drop-ins' slot memory behind diffusers' own state.

Requirement: ``load`` leaves the slots holding exactly the state it is given (in the slots the
returned plan names), copying nothing when the state is the views the last step handed out,
unmodified, and copying whatever else it is given (other tensors, views written in place, views of
the slots in other places, a new shape, dtype or layout); ``view`` hands out views of the slots
(no copy) that follow the history ring; a copied or pickled mirror starts empty. On both backends.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fastdiff
from fastdiff import ops
from fastdiff.compat._slots import SLOT_NAMES, SlotMirror, fusable
from fastdiff.reference import ROW_SIZE
from fastdiff.schedulers.linear import LinearStep

SHAPE = (2, 3, 4, 4)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernel runs (the CPU: the interpreter)
PUSH = LinearStep(convert=(0.0, 1.0, 0.0, 1.0), out={"x": 1.0, "m1": 0.5}, last={"c": 2.0}, push=True)  # c = m


def step(mirror: SlotMirror, sample, model_output, backend="torch", **state):
    """One op step on the mirror's slots: c = model_output pushed, last ← 2c; returns the views a drop-in
    hands out (m1, m2, last) and x_next = x + ½·m1 (m1 read before the push)."""
    plan = mirror.load(sample, **state)
    row = plan.pack(PUSH if "m1" in state else LinearStep(convert=PUSH.convert, out={"x": 1.0}, last=PUSH.last,
                                                          push=True))[:ROW_SIZE]
    with fastdiff.use_backend(backend):
        prev, _ = ops.multistep_update(model_output, sample, row, mirror.slots)
    mirror.stepped()
    return {"m1": mirror.view("m1"), "m2": mirror.view("m2"), "last": mirror.view("last")}, prev


def test_load_copies_the_state_into_the_slots_the_plan_names():
    mirror, sample = SlotMirror(), torch.randn(SHAPE)
    state = {name: torch.randn(SHAPE) for name in SLOT_NAMES}
    plan = mirror.load(sample, **state)
    assert mirror.slots.shape == (5, *SHAPE) and mirror.slots.dtype == sample.dtype
    for name, value in state.items():
        assert torch.equal(mirror.slots[plan.slot(name)], value)
    state["m1"].add_(1.0)  # copied, not aliased
    assert not torch.equal(mirror.slots[plan.slot("m1")], state["m1"])


def test_bad_names_and_shapes_are_refused():
    mirror, sample = SlotMirror(), torch.randn(SHAPE)
    with pytest.raises(ValueError, match="unknown slot name"):
        mirror.load(sample, m4=sample)
    with pytest.raises(ValueError, match="another batch"):
        mirror.load(sample, m1=torch.randn(1, *SHAPE[1:]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_handed_views_follow_the_ring_and_are_not_copied(backend, launches):
    device = DEVICE if backend == "triton" else "cpu"
    mirror, sample = SlotMirror(), torch.randn(SHAPE, device=device)
    outputs = [torch.randn(SHAPE, device=device) for _ in range(4)]
    views, prev = step(mirror, sample, outputs[0], backend)
    for k in range(1, 4):
        plan, slots = mirror.plan, mirror.slots
        expected_prev = sample + 0.5 * views["m1"]
        views_before = views
        views, prev = step(mirror, sample, outputs[k], backend, m1=views["m1"], last=views["last"])
        assert mirror.plan is plan and mirror.slots is slots  # in sync: no copy, the same buffer
        torch.testing.assert_close(prev, expected_prev, rtol=0, atol=1e-6)
        assert torch.equal(views["m1"], outputs[k]) and torch.equal(views["m2"], outputs[k - 1])
        assert torch.equal(views["last"], 2 * outputs[k])
        assert views["m2"].data_ptr() == views_before["m1"].data_ptr()  # renamed, not moved
        assert views["m1"].untyped_storage().data_ptr() == slots.untyped_storage().data_ptr()
    assert launches["multistep_update"] == (4 if backend == "triton" else 0)
    assert mirror.plan.steps == []  # stepped() keeps no step list


def changed_tensor(views):
    return {"m1": views["m1"].clone(), "m2": views["m2"]}


def written_in_place(views):
    views["m1"].mul_(3.0)
    return {"m1": views["m1"], "m2": views["m2"]}


def swapped(views):
    return {"m1": views["m2"], "m2": views["m1"]}


def view_of_another_name(views):
    return {"m1": views["m1"], "m2": views["last"]}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("change", [changed_tensor, written_in_place, swapped, view_of_another_name],
                         ids=["other-tensor", "written-in-place", "swapped-views", "view-of-another-slot"])
def test_anything_but_the_handed_views_is_copied(change, backend):
    device = DEVICE if backend == "triton" else "cpu"
    mirror, sample = SlotMirror(), torch.randn(SHAPE, device=device)
    views, _ = step(mirror, sample, torch.randn(SHAPE, device=device), backend)
    views, _ = step(mirror, sample, torch.randn(SHAPE, device=device), backend, m1=views["m1"])
    state = change(views)
    expected = {name: value.clone() for name, value in state.items()}
    plan = mirror.plan
    new_plan = mirror.load(sample, **state)
    assert new_plan is not plan  # the copy path
    for name, value in expected.items():  # views of the slots themselves are copied without clobbering
        assert torch.equal(mirror.slots[new_plan.slot(name)], value), name


def test_state_entries_that_are_none_are_not_read():
    mirror, sample = SlotMirror(), torch.randn(SHAPE)
    views, _ = step(mirror, sample, torch.randn(SHAPE))
    plan = mirror.plan
    assert mirror.load(sample, m1=views["m1"], m2=None, m3=None, last=None) is plan


@pytest.mark.parametrize("other", [lambda x: x.double(), lambda x: x[:1], lambda x: x.half(),
                                   lambda x: x.contiguous(memory_format=torch.channels_last)],
                         ids=["float64", "batch", "float16", "channels_last"])
def test_a_new_sample_kind_gets_new_slots(other):
    mirror, sample = SlotMirror(), torch.randn(SHAPE)
    views, _ = step(mirror, sample, torch.randn(SHAPE))
    slots = mirror.slots
    new = other(sample)
    mirror.load(new, m1=views["m1"].to(new.dtype)[:len(new)])
    assert mirror.slots is not slots and mirror.slots.shape[1:] == new.shape and mirror.slots.dtype == new.dtype
    assert mirror.slots[0].stride() == new.stride()  # the sample's layout
    kept = mirror.slots
    mirror.load(new)
    assert mirror.slots is kept  # and kept for the next step of the same kind


def test_slots_made_in_inference_mode_still_track_writes():
    mirror = SlotMirror()
    with torch.inference_mode():
        sample = torch.randn(SHAPE)
        views, _ = step(mirror, sample, torch.randn(SHAPE))
        assert not mirror.slots.is_inference()
        plan = mirror.plan
        assert mirror.load(sample, m1=views["m1"]) is plan
        views["m1"].add_(1.0)
        assert mirror.load(sample, m1=views["m1"]) is not plan


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_a_copied_mirror_starts_empty(duplicate):
    mirror, sample = SlotMirror(), torch.randn(SHAPE)
    views, _ = step(mirror, sample, torch.randn(SHAPE))
    twin = duplicate(mirror)
    assert twin.slots is None and mirror.slots is not None
    state = {"m1": views["m1"].clone()}
    plan = twin.load(sample, **state)  # copied in from the state it is given
    assert torch.equal(twin.slots[plan.slot("m1")], state["m1"])
    assert twin.slots.untyped_storage().data_ptr() != mirror.slots.untyped_storage().data_ptr()


def test_inputs_that_are_views_of_the_slots_are_cloned():
    mirror, sample = SlotMirror(), torch.randn(SHAPE)
    assert mirror.outside(sample) is sample  # no slots yet
    views, _ = step(mirror, sample, torch.randn(SHAPE))
    outside = mirror.outside(views["m1"])
    assert torch.equal(outside, views["m1"])
    assert outside.untyped_storage().data_ptr() != mirror.slots.untyped_storage().data_ptr()
    assert mirror.outside(sample) is sample and mirror.outside(None) is None


def test_fusable_needs_one_kernel_dtype_device_and_shape():
    x = torch.randn(SHAPE)
    assert fusable(x, x.clone(), None, torch.randn(SHAPE))
    assert fusable(x.half(), x.half()) and fusable(x.bfloat16())
    assert not fusable(x.double(), x.double())
    assert not fusable(x, x.half())
    assert not fusable(x, x[:1])  # broadcasting is diffusers' business
    assert not fusable(x, 1.0) and not fusable(None)
    assert not fusable(x, torch.randn(SHAPE, device="meta"))
