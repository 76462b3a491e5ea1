"""One DDIM step x_t -> x_{t-1} (Song et al. eq. 12), ε-prediction, η = 0, x̂0 clipped to [-1, 1]:
diffusers' DDIMScheduler defaults, the step a DDIM sampling loop runs once per U-Net call.

Providers: fastdiff (``fastdiff.ops`` on the triton backend: one fused kernel), reference (the
torch backend: about ten full-size elementwise ops), torch_peer (``torch.compile`` of the
reference). Memory bound: reads the model output and x_t, writes x_{t-1} and x̂0 (costs.ddim_step).
ᾱ_t and ᾱ_{t-1} arrive as 0-d float32 tensors on the device, as the pipeline's sampling loop
passes them: the kernel computes the step's coefficients itself (no host work, no copy).
"""

import pytest
import torch

import costs
import harness

OP = "ddim_step"

CASES = harness.elementwise_cases()  # 1M to 256M elements in fp32 and bf16


@pytest.mark.parametrize("provider", ["fastdiff", "reference", "torch_peer"])
def test_ddim_step(bench, env, case, provider):
    bench.skip_unless_runnable(provider, compiled=provider == "torch_peer")
    shape, dtype, device = case.dims["shape"], case.torch_dtype, env.device
    model_output = torch.randn(shape, device=device, dtype=dtype)
    sample = torch.randn(shape, device=device, dtype=dtype)
    # 0-d float32 on the device, as the sampling loop passes them (views of its step table); ᾱ grows as t falls
    alpha_prod_t, alpha_prod_t_prev = torch.tensor([0.5, 0.6], device=device).unbind()

    call = harness.op_checked(provider, OP, case, model_output, sample, alpha_prod_t, alpha_prod_t_prev,
                            eta=0.0, prediction_type="epsilon", clip_sample_range=1.0)
    cost = costs.ddim_step(sample.numel(), sample.element_size())
    bench.run(op=OP, provider=provider, case=case, cost=cost, **call)
