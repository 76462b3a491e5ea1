"""Forward noising q(x_t | x_0): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with a per-sample t (training, SDEdit).

Providers: fastdiff (``fastdiff.ops`` on the triton backend: one fused kernel), reference
(``fastdiff.ops`` on the torch backend: a gather, two roots, three full-size elementwise ops),
torch_peer (``torch.compile`` of the reference). Memory bound: reads x0 and ε, writes x_t
(costs.q_sample), so the figure of merit is GB/s, as a % of the copy bandwidth.
"""

import pytest
import torch

import costs
import harness

OP = "q_sample"
T = 1000  # length of the ᾱ table

CASES = harness.elementwise_cases()  # 1M to 256M elements in fp32 and bf16


@pytest.mark.parametrize("provider", ["fastdiff", "reference", "torch_peer"])
def test_q_sample(bench, env, case, provider):
    bench.skip_unless_runnable(provider, compiled=provider == "torch_peer")
    shape, dtype, device = case.dims["shape"], case.torch_dtype, env.device
    x0 = torch.randn(shape, device=device, dtype=dtype)
    noise = torch.randn(shape, device=device, dtype=dtype)
    timesteps = torch.randint(0, T, (shape[0],), device=device)
    alphas_cumprod = torch.linspace(0.9999, 0.0001, T, device=device)  # float32, as schedulers keep it

    call = harness.op_checked(provider, OP, case, x0, noise, timesteps, alphas_cumprod)
    cost = costs.q_sample(x0.numel(), shape[0], x0.element_size())
    bench.run(op=OP, provider=provider, case=case, cost=cost, **call)
