"""accelerate(..., cuda_graph=True): CUDA graphs for diffusers models (fastdiff/compat/_graphs.py).

On the CPU the bookkeeping runs with capture stubbed (``stub_graphs``: a "graph" replays the
function eagerly on the static buffers, reading its inputs only from them and writing its outputs
only into the static output, which is what a real replay does): one capture per signature, keys,
the bounded cache, clones handed out, eager fallbacks. The real graphs run in the ``gpu`` tests.
"""

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff.compat import _graphs  # noqa: E402
from fastdiff.compat.diffusers import accelerate, reset_cuda_graphs  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def stub_graphs(monkeypatch) -> list:
    """CUDA-graph capture stubbed on the CPU; returns one entry per capture."""
    captured = []
    monkeypatch.setattr(_graphs, "graphs_available", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: "stream")
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(_graphs, "warm_up", lambda fn, args, kwargs, stream: fn(*args, **kwargs))

    def capture(fn, args, kwargs, stream, pool):
        output = fn(*args, **kwargs)
        statics = [leaf for _, leaf in _graphs._leaves(output) if isinstance(leaf, torch.Tensor)]
        captured.append(args)

        def replay():
            fresh = [leaf for _, leaf in _graphs._leaves(fn(*args, **kwargs)) if isinstance(leaf, torch.Tensor)]
            for static, value in zip(statics, fresh):
                static.copy_(value)

        return replay, output

    monkeypatch.setattr(_graphs, "capture", capture)
    return captured


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 24), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=2).eval().requires_grad_(False)


def unet_inputs(batch=2, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=gen), torch.randn(batch, 3, 12, generator=gen)


def test_replays_give_the_eager_outputs_and_capture_once_per_signature(stub_graphs):
    eager = tiny_unet()
    unet = accelerate(copy.deepcopy(eager), cuda_graph=True)
    graphed = _graphs.graphed(unet)
    assert [type(g) for g in graphed] == [_graphs.GraphedForward]
    for seed, t in enumerate([torch.tensor(999), torch.tensor(500), 3, 7]):  # tensor and Python timesteps
        x, text = unet_inputs(seed=seed)
        out = unet(x, t, encoder_hidden_states=text)
        assert torch.equal(out.sample, eager(x, t, encoder_hidden_states=text).sample)
    # a 0-d tensor timestep and a Python int (made the model's own int64 tensor of shape (1,)) differ
    assert len(stub_graphs) == 2 and graphed[0].captures == 2
    x, text = unet_inputs(batch=1, size=16)  # a new shape: captured again
    assert torch.equal(unet(x, 3, encoder_hidden_states=text, return_dict=False)[0],
                       eager(x, 3, encoder_hidden_states=text).sample)
    assert len(stub_graphs) == 3
    mask = torch.ones(1, 3)  # an optional input given: another signature
    unet(x, 3, encoder_hidden_states=text, encoder_attention_mask=mask)
    assert len(stub_graphs) == 4


def test_a_returned_output_is_not_rewritten_by_the_next_replay(stub_graphs):
    unet = accelerate(tiny_unet(), cuda_graph=True)
    x, text = unet_inputs()
    first = unet(x, torch.tensor(10), encoder_hidden_states=text).sample
    kept = first.clone()
    unet(x + 1, torch.tensor(20), encoder_hidden_states=text)
    assert len(stub_graphs) == 1 and torch.equal(first, kept)


def test_the_cache_keeps_the_most_recent_signatures(stub_graphs):
    unet = accelerate(tiny_unet(), cuda_graph=True, max_graphs=2)
    for size in (8, 16, 8, 24, 16):  # 16 was evicted by 24 (8 had been used after it)
        x, text = unet_inputs(batch=1, size=size)
        unet(x, 1, encoder_hidden_states=text)
    assert [args[0].shape[-1] for args in stub_graphs] == [8, 16, 24, 16]
    assert len(_graphs.graphed(unet)[0].graphs) == 2


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, options=None, tags=None):  # tags: unused
        return {"y": self.linear(x) * (options or {}).get("gain", 1.0)}


def test_what_cannot_be_graphed_runs_eagerly(stub_graphs, monkeypatch):
    toy = Toy()
    graphed = _graphs.install(toy, "forward")
    x = torch.randn(2, 4)
    toy(x)  # grad mode on and the parameters require grad: autograd must record, no graph
    assert stub_graphs == []
    with torch.no_grad():
        assert torch.equal(toy(x, tags={"a"})["y"], toy.linear(x))  # a set: unhashable, no key, eager
        assert stub_graphs == []
        assert torch.equal(toy(x, {"gain": 2.0})["y"], toy.linear(x) * 2)  # numbers are part of the key
        assert len(stub_graphs) == 1
        toy(x, {"gain": 3.0})
        assert len(stub_graphs) == 2

    def failing(fn, args, kwargs, stream, pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(_graphs, "capture", failing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="could not capture Toy .*not permitted.*eagerly"):
            assert torch.equal(toy(torch.ones(3, 4))["y"], toy.linear(torch.ones(3, 4)))
        toy(torch.ones(3, 4))  # known to fail: eager, no second attempt (no warning either)
    assert graphed.captures == 2 and graphed.graphs[next(reversed(graphed.graphs))].replay is None
    assert _graphs.install(toy, "forward") is graphed  # idempotent
    assert _graphs.uninstall(toy, "forward") and "forward" not in vars(toy)


def test_vae_decode_is_graphed_and_ignores_the_generator(stub_graphs):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=2, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval().requires_grad_(False)
    eager = copy.deepcopy(vae)
    accelerate(vae, cuda_graph=True)
    assert "decode" in vars(vae) and "forward" not in vars(vae)
    z = torch.randn(1, 4, 4, 4)
    for seed in (1, 2):
        out = vae.decode(z * seed, return_dict=False, generator=torch.Generator().manual_seed(seed))[0]
        assert torch.equal(out, eager.decode(z * seed).sample)
    assert len(stub_graphs) == 1


def test_a_pipeline_replays_one_graph_for_every_step(stub_graphs):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=2, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                    output_type="np").images

    expected = images()
    accelerate(pipe, cuda_graph=True)
    assert torch.equal(torch.from_numpy(images()), torch.from_numpy(expected))
    graphed = _graphs.graphed(pipe.unet)
    assert len(stub_graphs) == 1 and graphed[0].graphs[next(iter(graphed[0].graphs))].replays == 4


def test_reset_drops_the_graphs_and_bad_arguments_are_refused(stub_graphs):
    unet = accelerate(tiny_unet(), cuda_graph=True)
    x, text = unet_inputs()
    unet(x, 5, encoder_hidden_states=text)
    assert reset_cuda_graphs(unet) == 1
    unet(x, 5, encoder_hidden_states=text)
    assert len(stub_graphs) == 2
    with pytest.raises(TypeError, match="pipe_or_model"):
        reset_cuda_graphs("unet")
    with pytest.raises(ValueError, match="max_graphs"):
        accelerate(tiny_unet(), cuda_graph=True, max_graphs=0)
    with pytest.raises(TypeError, match="cuda_graph"):
        accelerate(tiny_unet(), cuda_graph="yes")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_graphed_unet_matches_eager_and_sees_weights_changed_in_place():
    unet = tiny_unet().cuda()
    eager = copy.deepcopy(unet)
    accelerate(unet, cuda_graph=True)
    x, text = (t.cuda() for t in unet_inputs())
    with torch.no_grad():
        for t in (900, 400, 10):
            torch.testing.assert_close(unet(x, t, encoder_hidden_states=text).sample,
                                       eager(x, t, encoder_hidden_states=text).sample, rtol=1e-5, atol=1e-5)
        assert _graphs.graphed(unet)[0].captures == 1
        for model in (unet, eager):  # in place: a replay reads the new values
            model.conv_out.weight.mul_(0.5)
        torch.testing.assert_close(unet(x, 10, encoder_hidden_states=text).sample,
                                   eager(x, 10, encoder_hidden_states=text).sample, rtol=1e-5, atol=1e-5)
        before = unet(x, 10, encoder_hidden_states=text).sample
        unet.conv_out.weight = torch.nn.Parameter(unet.conv_out.weight * 2, requires_grad=False)  # replaced
        assert torch.equal(unet(x, 10, encoder_hidden_states=text).sample, before)  # the documented limit
        reset_cuda_graphs(unet)
        assert not torch.equal(unet(x, 10, encoder_hidden_states=text).sample, before)


def test_an_eager_call_gets_its_arguments_as_given():
    """No graph (CPU tensors, no stub): the timestep is not rewritten (the model picks its own dtype
    per device; on MPS float64 would not even exist)."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, sample, timestep):
            seen.append(timestep)
            return sample

    probe = Probe()
    _graphs.install(probe, "forward", normalize=_graphs.timestep_as_tensor(long_for_float=False))
    probe(torch.ones(2), 3.5)
    assert seen == [3.5]


def test_a_broadcast_input_gets_a_writable_buffer(stub_graphs):
    eager = tiny_unet()
    unet = accelerate(copy.deepcopy(eager), cuda_graph=True)
    x, text = unet_inputs()
    for t in (40, 7):
        timesteps = torch.tensor(t).expand(2)  # stride 0: cannot be copied into as it is
        assert torch.equal(unet(x, timesteps, encoder_hidden_states=text).sample,
                           eager(x, timesteps, encoder_hidden_states=text).sample)
    assert len(stub_graphs) == 1
