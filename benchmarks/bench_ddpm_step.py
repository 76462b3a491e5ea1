"""One ancestral DDPM step x_t -> x_{t-1} (Ho et al. eq. 7 + σ_t·z), ε-prediction, fixed_small
variance, x̂0 clipped to [-1, 1]: diffusers' DDPMScheduler defaults, at a step that adds noise.

Providers: fastdiff (``fastdiff.ops`` on the triton backend: one fused kernel), reference (the
torch backend), torch_peer (``torch.compile`` of the reference). Memory bound: reads the model
output, x_t and z, writes x_{t-1} and x̂0 (costs.ddpm_step). The noise z is drawn by the caller
(the scheduler, from the user's generator), so it is an input here and drawing it is not timed.
ᾱ_t and ᾱ_{t-1} are 0-d float32 tensors on the device, as the pipeline's sampling loop passes them.
"""

import pytest
import torch

import costs
import harness

OP = "ddpm_step"

CASES = harness.elementwise_cases()  # 1M to 256M elements in fp32 and bf16


@pytest.mark.parametrize("provider", ["fastdiff", "reference", "torch_peer"])
def test_ddpm_step(bench, env, case, provider):
    bench.skip_unless_runnable(provider, compiled=provider == "torch_peer")
    shape, dtype, device = case.dims["shape"], case.torch_dtype, env.device
    model_output, sample, noise = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    # 0-d float32 on the device, as the sampling loop passes them (views of its step table); ᾱ grows as t falls
    alpha_prod_t, alpha_prod_t_prev = torch.tensor([0.5, 0.6], device=device).unbind()

    call = harness.op_checked(provider, OP, case, model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise,
                            prediction_type="epsilon", variance_type="fixed_small", clip_sample_range=1.0)
    cost = costs.ddpm_step(sample.numel(), sample.element_size(), noise=True)
    bench.run(op=OP, provider=provider, case=case, cost=cost, **call)
