"""diffusion.py, the graded interface, as the assignment checks it: for both time embeddings ("add", the
default scale and shift, and "concat", t through one embedding layer concatenated with the features) the
outputs have the shapes of the inputs and train_step returns a Python float; and the tensors it returns
are on the device of the tensors it was given, whatever device the process computes on.
(That the model's output changes with t, for both embeddings, is in test_conditioning.py.)"""
import pytest
import torch

from tools import ddpm_figures
import diffusion


@pytest.mark.parametrize("time_embed", ["add", "concat"])
def test_the_assignment_check(time_embed):
    torch.manual_seed(0)
    model = diffusion.DiffusionModel(image_size=28, channels=1, time_embed=time_embed)   # the default preset
    x, t = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,))
    assert model(x, t).shape == x.shape
    process = diffusion.DiffusionProcess(image_size=28, channels=1, noise_steps=1000, device="cpu",
                                         model=diffusion.DiffusionModel(28, 1, "tiny", time_embed))
    noisy_x, noise = process.add_noise(x, t)
    assert noisy_x.shape == noise.shape == x.shape
    ab = process.ddpm.alpha_bar[t][:, None, None, None]
    assert torch.allclose(noisy_x, ab.sqrt() * x + (1 - ab).sqrt() * noise, atol=1e-6)
    loss = process.train_step(x.clamp(-1, 1))
    assert type(loss) is float and loss == loss
    assert process.sample(2, steps=2).shape == (2, 1, 28, 28)


def test_concat_takes_t_through_one_embedding_layer():
    model = diffusion.DiffusionModel(28, 1, "tiny", time_embed="concat", noise_steps=50)
    assert isinstance(model.time_mlp, torch.nn.Embedding) and model.time_mlp.num_embeddings == 50
    t_dim = model.time_mlp.embedding_dim
    blocks = [b for level in model.downs + model.ups for b in level.blocks] + list(model.mid)
    assert blocks and all(isinstance(b, ddpm_figures.ConcatResBlock) for b in blocks)
    assert all(b.conv1.in_channels == b.norm1.num_channels + t_dim for b in blocks)   # the features, then t
    assert not any(isinstance(m, torch.nn.Linear) for b in blocks for m in b.modules())  # no other way in
    with pytest.raises(SystemExit, match="50 rows, fewer than noise_steps"):
        diffusion.DiffusionProcess(model=model, noise_steps=1000, device="cpu")
    with pytest.raises(SystemExit, match="unknown time_embed 'film'"):
        diffusion.DiffusionModel(time_embed="film")


def test_outputs_follow_the_inputs_device():
    """CPU tensors in, CPU tensors out, even from a process built with device="auto": on a GPU machine
    add_noise used to return CUDA tensors. Without a GPU, inputs on the "meta" device stand for tensors on
    another device than the process's (the old add_noise moved them to the process's device and failed)."""
    process = diffusion.DiffusionProcess(model=diffusion.DiffusionModel(28, 1, "tiny"), device="auto")
    x, t = torch.randn(3, 1, 28, 28), torch.randint(0, 1000, (3,))
    for x_in, t_in in ((x, t), (x.to("meta"), t.to("meta"))):
        noisy, noise = process.add_noise(x_in, t_in)
        assert noisy.device == noise.device == x_in.device and noisy.shape == x_in.shape
    assert type(process.train_step(x)) is float
