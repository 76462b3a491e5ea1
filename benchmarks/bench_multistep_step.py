"""One step of a linear multistep sampler, ``fastdiff.ops.multistep_update``, in its steady state.

The op that runs every step of DPM-Solver(++), UniPC, Euler(-ancestral) and PNDM
(``fastdiff.schedulers.linear``). Three samplers, each alone and with classifier-free guidance
(``_cfg``: the unconditional output and w = 7.5 fused into the step), at step 10 of 20:

* dpmpp2m: DPM-Solver++(2M), ``DPMSolverMultistepScheduler()`` (second order, midpoint): reads m1,
  pushes c;
* unipc_bh2: UniPC, ``UniPCMultistepScheduler()`` (bh2, order 2): the corrector UniC-2 and the
  predictor UniP-2 in one launch: reads m1, m2 and last, sets last, pushes c;
* euler: ``EulerDiscreteScheduler()`` (no churn): no slots; writes x̂0 (its pred_original_sample).

Providers: fastdiff (``fastdiff.ops`` on the triton backend: one launch), reference (the torch
backend), torch_peer (``torch.compile`` of the reference), diffusers (the stock diffusers
scheduler's ``step`` on the same state, after the pipelines' guidance combine u + w·(c − u)).

The state: both schedulers run the first 10 steps on the same model outputs and samples (fastdiff
through the op with the rows of its sync-free loop's table, in its slot buffers), so the step timed
is the same step with the same history in both. The row is the table's, on the device, as the loop
passes it. Each fused provider gets its own copy of the slots and updates it in place, as the loop
does; the check compares x_next (and x̂0) and the slots after one step with the reference's.
diffusers' step changes its Python state (step index, history lists): it is put back before every
call, so every timed call is step 10 (a dict update and a list copy or two: ~1 µs of host time,
timed with it). The fused providers' timed calls repeat step 10's row on the slots as the calls
before left them (UniPC's last moves; the same bytes and arithmetic every call).

Memory bound (costs.multistep_step: each tensor read or written once, slots included, plus the
packed row; a few FLOPs per element). Prediction, from the byte counts: DPM-Solver++(2M) with
guidance moves 6 tensors, so at 16x3x256x256 75 MB in fp32 (38 MB in bf16), ~19 µs (~10 µs) at an
H200's ~4 TB/s, where the fused step should come near the copy ceiling; at Stable Diffusion's
latents (16K-256K elements per tensor, 0.4-6 MB in fp32) the bytes take under 2 µs, so a launch (~3-5 µs)
is most of the time and the gap to diffusers is its count of launches: its step runs the equations
as separate elementwise ops, each a pass over memory, with host work on 0-d tensors between them.
"""

from dataclasses import dataclass

import pytest
import torch

import costs
import fastdiff
import harness
from fastdiff import ops
from fastdiff.reference import ROW_SIZE
from fastdiff.schedulers.linear import slot_buffers

OP = "multistep_step"
FUSED_OP = "multistep_update"  # its name in fastdiff.ops and fastdiff.reference
PROVIDERS = ["fastdiff", "reference", "torch_peer", "diffusers"]
SOLVERS = {"dpmpp2m": "DPMSolverMultistepScheduler", "unipc_bh2": "UniPCMultistepScheduler",
           "euler": "EulerDiscreteScheduler"}  # the same class name in fastdiff and diffusers, default config
STEPS, STEADY = 20, 10  # a 20-step run, timed at its step 10 (past the lower-order warm-up, before the final steps)
GUIDANCE_SCALE = 7.5  # Stable Diffusion's default

LATENTS = [(1, 4, 64, 64), (2, 4, 64, 64), (4, 4, 64, 64), (8, 4, 64, 64), (4, 4, 128, 128)]  # SD 1.x / 2.x
PIXELS = [(64, 3, 32, 32), (16, 3, 256, 256)]
VARIANTS = [(solver, guided) for solver in SOLVERS for guided in (True, False)]  # the main case first
QUICK_SHAPES = [(2, 4, 64, 64), (16, 3, 256, 256)]  # an SD latent batch, the largest pixel batch
CPU_CASES = [("dpmpp2m", True), ("unipc_bh2", False), ("euler", True)]  # each sampler, both guidance paths


def _shape(solver: str, guided: bool, shape: tuple, tiers: set) -> tuple[str, dict, set]:
    name = f"{solver}{'_cfg' if guided else ''}_{harness.fmt_shape(shape)}"
    return name, {"solver": solver, "guided": guided, "shape": shape}, tiers


def _cases() -> list[harness.Case]:
    """DPM-Solver++(2M) with guidance, Stable Diffusion's usual sampler, at every size; the other five
    variants at QUICK_SHAPES. Quick: the main case at QUICK_SHAPES in fp32 and bf16, UniPC and Euler
    with guidance at 2x4x64x64 in bf16. CPU: one SD latent (1x4x64x64) per sampler, in fp32."""
    main = [_shape("dpmpp2m", True, s, {"full", "quick"} if s in QUICK_SHAPES else {"full"}) for s in LATENTS + PIXELS]
    others = [_shape(solver, guided, s, {"full", "quick"} if guided and s == QUICK_SHAPES[0] else {"full"})
              for solver, guided in VARIANTS[1:] for s in QUICK_SHAPES]
    cpu = [_shape(solver, guided, (1, 4, 64, 64), {"cpu"}) for solver, guided in CPU_CASES]
    return (harness.expand(main + cpu, {"full": ("fp32", "bf16"), "quick": ("fp32", "bf16"), "cpu": ("fp32",)})
            + harness.expand(others, {"full": ("fp32", "bf16"), "quick": ("bf16",)}))


CASES = _cases()


# ----------------------------------------------------------------------------- the steady state
@dataclass
class SteadyState:
    """What step STEADY of a run starts from: the step's row, fastdiff's slots, the diffusers
    scheduler after the same steps (None unless asked for), and the step's inputs."""

    row: torch.Tensor  # (ROW_SIZE,) float32 on the device: the loop's table row
    slots: torch.Tensor | None  # (5, *shape); None: the sampler keeps none (Euler)
    theirs: object | None  # a diffusers scheduler whose next step is STEADY
    model_output: torch.Tensor  # (*shape): the conditional output when guided
    uncond: torch.Tensor | None  # (*shape): the unconditional output when guided
    sample: torch.Tensor  # (*shape): x at step STEADY, the run's own
    returns_x0: bool  # the scheduler returns x̂0 (Euler's pred_original_sample): the op writes it


def steady_state(solver: str, guided: bool, shape, dtype, device, with_diffusers: bool) -> SteadyState:
    """Run steps 0..STEADY−1 of both schedulers on the same random model outputs, each step's sample
    the reference op's output, and draw step STEADY's inputs: from a generator of their own (seed 0),
    since diffusers' Euler step draws from the global one even without churn."""
    g = torch.Generator(device).manual_seed(0)

    def randn():
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    ours = getattr(fastdiff, SOLVERS[solver])()
    ours.set_timesteps(STEPS)
    rows = ours.step_tables(ours.timesteps).rows[:, :ROW_SIZE].to(device)  # (STEPS, ROW_SIZE)
    theirs = None
    if with_diffusers:
        diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
        theirs = getattr(diffusers, SOLVERS[solver]).from_config(ours.config)
        theirs.set_timesteps(STEPS, device=device)
        theirs.is_scale_input_called = True  # Euler warns otherwise: the U-Net input scale is not the step's
    sample = randn() * ours.init_noise_sigma
    slots = slot_buffers(sample) if ours.memory else None
    for i in range(STEADY):
        model_output = randn()
        if theirs is not None:
            theirs.step(model_output, theirs.timesteps[i], sample)
        with fastdiff.use_backend("torch"):
            sample = ops.multistep_update(model_output, sample, rows[i], slots)[0]
    model_output = randn()
    uncond = randn() if guided else None
    return SteadyState(rows[STEADY], slots, theirs, model_output, uncond, sample, ours.returns_pred_original)


def fused_step(provider: str, state: SteadyState):
    """``fastdiff.ops.multistep_update`` as ``provider`` runs it, on its own copy of the slots:
    returns (x_next, [x̂0], [slots])."""
    slots = None if state.slots is None else state.slots.clone()
    guidance_scale = 1.0 if state.uncond is None else GUIDANCE_SCALE
    call = harness.op_call(provider, FUSED_OP, state.model_output, state.sample, state.row, slots,
                           uncond_model_output=state.uncond, guidance_scale=guidance_scale,
                           return_converted=state.returns_x0)

    def step():
        prev_sample, x0 = call()
        return tuple(t for t in (prev_sample, x0, slots) if t is not None)

    return step


def diffusers_step(state: SteadyState):
    """The stock scheduler's ``step`` at step STEADY, after the guidance combine of diffusers'
    pipelines: returns (prev_sample, [pred_original_sample])."""
    theirs = state.theirs
    saved = dict(vars(theirs))  # step index, order counters, last_sample, ...
    lists = {key: list(value) for key, value in saved.items() if isinstance(value, list)}  # model_outputs, ...
    timestep = theirs.timesteps[STEADY]
    m, u, x = state.model_output, state.uncond, state.sample

    def step():
        vars(theirs).update(saved)
        for key, value in lists.items():  # step assigns into these lists: each call gets fresh copies
            setattr(theirs, key, list(value))
        model_output = m if u is None else u + GUIDANCE_SCALE * (m - u)
        out = theirs.step(model_output, timestep, x, return_dict=False)
        return tuple(out[:1 + state.returns_x0])

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
def test_multistep_step(bench, env, case, provider):
    bench.skip_unless_runnable(provider, compiled=provider == "torch_peer")
    solver, guided, shape = case.dims["solver"], case.dims["guided"], case.dims["shape"]
    state = steady_state(solver, guided, shape, case.torch_dtype, env.device, with_diffusers=provider == "diffusers")
    if provider == "diffusers":
        fn, reference = diffusers_step(state), fused_step("reference", state)
        expected = lambda: reference()[:1 + state.returns_x0]  # noqa: E731 (diffusers' state is not fastdiff's slots)
    else:
        fn = fused_step(provider, state)
        expected = None if provider == "reference" else fused_step("reference", state)
    cost = costs.multistep_step(state.sample.numel(), state.sample.element_size(), solver, guided=guided)
    bench.run(op=OP, provider=provider, case=case, fn=fn, cost=cost, expected=expected,
              tolerance=harness.TOLERANCE[case.dtype],
              extra={"solver": solver, "guided": guided, "step": STEADY, "steps": STEPS})
