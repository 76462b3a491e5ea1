"""fastdiff's slot memory behind a diffusers multistep scheduler's own state.

diffusers' multistep schedulers keep their history as attributes (DPM-Solver's and UniPC's
``model_outputs`` list, PNDM's ``ets``, ``cur_sample``, ...) that pipelines, callbacks and diffusers'
own tests read and sometimes set. A drop-in keeps diffusers' attributes as the truth and runs each
step on fastdiff's fused op, whose memory is a (MULTISTEP_SLOTS, *sample.shape) buffer:

* after a step the drop-in puts views of its slots into diffusers' attributes (``view``), so nothing
  is copied and diffusers' state reads the same values it would hold itself;
* before a step ``load`` checks that the attributes still hold exactly those views, unmodified (same
  objects, the buffer's version counter where the step left it). Then the slots are already right:
  the fast path. Anything else (a user's tensor put in, a view written in place, a new shape or
  dtype, a history diffusers built itself) copies the attributes into the slots first.

What differs from diffusers' plain tensors: a view handed out is rewritten when the ring comes back
to its slot (after it has left diffusers' attributes; a caller keeping one longer clones it). A copy
or pickle of a mirror holds no slots (the next ``load`` copies from the attributes), and the slots are
made outside ``torch.inference_mode`` (an inference tensor has no version counter to check).

This module does not import diffusers.
"""

from __future__ import annotations

import torch

from ..schedulers.linear import HISTORY, LinearPlan, slot_buffers

SLOT_NAMES = (*HISTORY, "last", "acc")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the fused op computes on


def fusable(sample, *tensors) -> bool:
    """Whether the fused op takes ``tensors`` (None entries skipped) with ``sample``: floating tensors of
    one kernel dtype, on one device, each of the sample's shape (no broadcasting)."""
    if not isinstance(sample, torch.Tensor) or sample.dtype not in KERNEL_DTYPES:
        return False
    return all(isinstance(x, torch.Tensor) and x.dtype == sample.dtype and x.device == sample.device
               and x.shape == sample.shape for x in tensors if x is not None)


class SlotMirror:
    """The slots of one drop-in scheduler and the views of them it handed to diffusers' state."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self.plan = LinearPlan()
        self._handed: dict[str, torch.Tensor] = {}
        self._version = -1

    def __getstate__(self) -> dict:
        # a copy or pickle starts empty: the views in the copied attributes are no longer this
        # buffer's, so the next load copies them in (and a pickle does not carry the buffer twice)
        return {"slots": None, "plan": LinearPlan(), "_handed": {}, "_version": -1}

    def _fits(self, sample: torch.Tensor) -> bool:
        slots = self.slots
        return (slots is not None and slots.shape[1:] == sample.shape and slots.dtype == sample.dtype
                and slots.device == sample.device and slots[0].stride() == slot_buffers_stride(sample))

    def _in_sync(self, state: dict[str, torch.Tensor | None]) -> bool:
        if self.slots is None or self.slots._version != self._version:
            return False
        return all(value is None or self._handed.get(name) is value for name, value in state.items())

    def load(self, sample: torch.Tensor, **state: torch.Tensor | None) -> LinearPlan:
        """Make the slots hold ``state`` (names of ``SLOT_NAMES``: the tensors the next step reads;
        None: not read) and return the plan that says where each lives. ``sample`` fixes the slots'
        shape, dtype, device and layout."""
        unknown = set(state) - set(SLOT_NAMES)
        if unknown:
            raise ValueError(f"unknown slot name(s) {sorted(unknown)}; slots are {', '.join(SLOT_NAMES)}")
        if not self._fits(sample):
            with torch.inference_mode(False):  # a normal tensor, whose version counter _in_sync reads
                self.slots = slot_buffers(sample)
            self._handed, self._version = {}, -1
        if self._in_sync(state):
            return self.plan
        # copy diffusers' state in: history m1, m2, m3 in ring slots 2, 1, 0 (a plan three pushes in);
        # a source that is a view of these slots is cloned first, so no copy overwrites a later source
        sources = {name: value.detach().clone() if _aliases(value, self.slots) else value.detach()
                   for name, value in state.items() if value is not None}
        self.plan = LinearPlan(pushes=3)
        for name, value in sources.items():
            if value.shape != sample.shape:
                raise ValueError(f"the scheduler's stored {name} has shape {tuple(value.shape)}, the sample "
                                 f"{tuple(sample.shape)}: a history from another batch cannot be continued")
            self.slots[self.plan.slot(name)].copy_(value)
        self._handed = {}
        return self.plan

    def outside(self, tensor):
        """``tensor``, cloned where it is a view of the slots: a step's input (a caller may pass back a tensor
        of diffusers' state) that ``load``'s copies or the step's own writes could overwrite before it is read."""
        if isinstance(tensor, torch.Tensor) and self.slots is not None and _aliases(tensor, self.slots):
            return tensor.clone()
        return tensor

    def view(self, name: str) -> torch.Tensor:
        """A view of the slot ``name`` lives in after the step just packed, to put in diffusers' state
        (hand out every tensor of the state after each step: a push renames the history, m1 → m2)."""
        tensor = self.slots[self.plan.slot(name)]
        self._handed[name] = tensor
        return tensor

    def stepped(self) -> None:
        """Call after the op wrote the slots and before ``view``: records the buffer's version (any later
        in-place write is a change) and forgets the views handed out before."""
        self._version = self.slots._version
        self._handed = {}
        self.plan.steps.clear()  # only the ring position matters here; a long-lived mirror keeps no step list


def slot_buffers_stride(sample: torch.Tensor) -> tuple[int, ...]:
    """The strides one slot of ``slot_buffers(sample)`` has (its memory layout follows the sample's)."""
    if sample.ndim == 4 and sample.is_contiguous(memory_format=torch.channels_last) and not sample.is_contiguous():
        return torch.empty(sample.shape, device="meta").to(memory_format=torch.channels_last).stride()
    return torch.empty(sample.shape, device="meta").stride()


def _aliases(tensor: torch.Tensor, slots: torch.Tensor) -> bool:
    return tensor.device == slots.device and tensor.untyped_storage().data_ptr() == slots.untyped_storage().data_ptr()
