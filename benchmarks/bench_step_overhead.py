"""How much of a graphed DDIM step is not the U-Net (goal: under 2% with CUDA graphs).

Two timings per case, the DDPM CIFAR-10 U-Net with the same seed-0 weights, on the triton backend:

* step: a whole DDIM sampling run, ``DiffusionPipeline(...)(cuda_graph=True)``, one pipeline for
  every call, so the untimed first call captures the step's graph and every timed call replays it;
  step_ms = median_ms / steps (the run's median, the record's ``median_ms``);
* U-Net: ``unet(x, t)`` alone, as the loop calls it (x a fixed (B, 3, 32, 32) buffer, t a (1,) int64
  on the device), captured into a ``torch.cuda.CUDAGraph`` and replayed ``steps`` times per timed
  call: the same U-Net launches with nothing around them; unet_ms_per_step = its median / steps.

pct_overhead = 100·(step_ms − unet_ms_per_step) / step_ms: what a step does besides the U-Net (the
gathers of t and of the ᾱ pair, the fused DDIM step, the copy of x_{t−1} into the loop's buffer,
the index increment) plus each call's fixed cost spread over its steps (set_timesteps and the graph
lookup on the host, the starting noise, the final scaling). Both sides are graph replays, so
neither pays Python per launch.

Prediction. Per step, ~5 small kernels outside the U-Net, ~10–15 µs in a graph; per call, a few
hundred µs of host work before the first replay. At B = 1 the U-Net itself is latency bound
(hundreds of small kernels, ~0.5–1 ms), so the overhead is ~2–3% there; at B ≥ 128 the U-Net takes
milliseconds per step and the overhead falls well under 1%. The quick tier's 10 steps spread the
per-call cost over 5× fewer steps than the full tier's 50.

GPU only: on a CPU the case is skipped (no CUDA graphs), with the reason in the run's JSON.
"""

import pytest
import torch

import costs
import harness
import fastdiff
from bench_end_to_end import CASES as END_TO_END_CASES
from bench_end_to_end import GRAPH_SKIP, STEPS, build_unet, fastdiff_sampler, reference_images

OP = "step_overhead"
PROVIDER = "fastdiff_graph"
GOAL_PCT = 2.0  # the bound on the per-step overhead outside the U-Net
# Both timings alike: calls of tens of ms (B = 1) to seconds (B = 256, fp32).
TIMING = {"warmup_ms": 100, "rep_ms": 2000, "min_reps": 5, "max_reps": 30}

# The end-to-end cases (same ids, so the two files' records line up). The CPU tier's one case is
# skipped, so that the skip and its reason reach the report.
CASES = END_TO_END_CASES


class UNetGraph:
    """``unet(x, t)`` captured into a CUDA graph, with the fixed inputs it reads (kept alive here:
    the graph reads their memory in place) and the output it writes."""

    def __init__(self, unet: fastdiff.UNet2D, batch: int, backend: str = "triton"):
        cfg = unet.config
        self.x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=unet.device,
                             dtype=unet.dtype)  # (B, C, H, W)
        self.t = torch.full((1,), 500, dtype=torch.int64, device=unet.device)  # (1,): the loop's timesteps[i]
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), fastdiff.use_backend(backend):
            # PyTorch's recipe: warm up on a side stream (Triton compiles, cuDNN picks its algorithms,
            # the allocator fills), then capture; the capture itself runs nothing.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    unet(self.x, self.t)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(self.graph):
                self.out = unet(self.x, self.t)  # (B, C, H, W), in the graph's memory pool

    def replay(self, times: int) -> torch.Tensor:
        for _ in range(times):
            self.graph.replay()
        return self.out


def overhead(step_run_ms: float, unet_run_ms: float, steps: int) -> dict:
    """Per-step times of the two runs and the share of a step that is not the U-Net."""
    step_ms, unet_ms = step_run_ms / steps, unet_run_ms / steps
    return {"step_ms": step_ms, "unet_ms_per_step": unet_ms, "pct_overhead": 100 * (step_ms - unet_ms) / step_ms,
            "overhead_goal_pct": GOAL_PCT}


def test_step_overhead(bench, env, case):
    if not env.on_gpu:
        pytest.skip(f"{OP}: {GRAPH_SKIP}")
    preset, batch, steps = case.dims["preset"], case.dims["B"], STEPS[env.tier]
    unet = build_unet(preset, env.device, case.torch_dtype)

    unet_graph = UNetGraph(unet, batch)
    unet_run = harness.timed(lambda: unet_graph.replay(steps), env.device, **TIMING)

    sample = fastdiff_sampler(unet, batch, steps, "triton", cuda_graph=True)
    cost = costs.sampling(costs.unet_flops_per_image(preset), batch, steps)
    # The graphed run's images against the reference's, recorded (as end to end): a replay that read
    # stale buffers would show here. The check's call is the one that captures the graph.
    info = bench.run(op=OP, provider=PROVIDER, case=case, fn=sample, cost=cost, flush_l2=False,
                     expected=lambda: reference_images(case, env.device, steps),
                     extra={"sampler": f"DDIM-{steps}", "steps": steps, "preset": preset,
                            "unet_graph_median_ms": unet_run.median_ms, "unet_graph_reps": unet_run.reps},
                     rounds=1, **TIMING)
    bench.benchmark.extra_info.update(overhead(info["median_ms"], unet_run.median_ms, steps))
