"""The second reference model (benchmarks/reference_flux.py): the committed weights load into
ComfyUI's own Flux class and ComfyUI's sampler draws the digits asked for; the training script
learns and is deterministic."""
import pytest
import torch

import comfy_env

pytestmark = [pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH"),
              pytest.mark.usefixtures("one_thread")]

# a much smaller Flux than the committed one, so a training run takes a second or two
TINY = {"image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16, "vec_in_dim": 8,
        "context_in_dim": 8, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True}


@pytest.fixture(scope="module")
def flux():
    from benchmarks import reference_flux
    reference_flux.load_comfy()
    return reference_flux


def test_committed_weights_are_comfyui_flux_and_sample_the_asked_digits(flux):
    import comfy.ldm.flux.model
    from benchmarks.judge import load_judge

    patcher = flux.load_reference_flux()
    assert isinstance(patcher.model.diffusion_model, comfy.ldm.flux.model.Flux)
    labels = torch.arange(10)
    latent = flux.sample(patcher, labels, steps=8, sampler="euler", seed=3)
    assert latent.shape == (10, 16, 32, 32)        # 16x16 patches of 2: 256 image tokens
    images = flux.to_digits(patcher, latent)
    judge = load_judge()
    assert judge.accuracy(images, labels) >= 0.6    # chance is 0.1
    # the conditioning matters: the same noise asked for other digits is read as those digits
    shifted = (labels + 5) % 10
    other = flux.to_digits(patcher, flux.sample(patcher, shifted, steps=8, sampler="euler", seed=3))
    assert judge.accuracy(other, shifted) >= 0.6
    assert (other - images).abs().mean() > 0.1


def test_digit_latent_mapping_round_trips_through_comfyui_latent_format(flux):
    from benchmarks.digits import load_digits_tensors

    patcher = flux.build_patcher(TINY)
    digits, _ = load_digits_tensors(size=flux.LATENT_SIZE)
    digits = digits[:4]
    model_space = flux.encode(digits)
    # what comfy.sample.sample would return for a model that denoised exactly to `model_space`
    returned = patcher.model.latent_format.process_out(model_space)
    back = flux.to_digits(patcher, returned)
    expected = torch.nn.functional.avg_pool2d(digits, 2)
    assert torch.allclose(back, expected, atol=1e-5)
    assert model_space.shape[1] == 16 and model_space.std() > 0.5     # every channel carries the digit


def test_training_loss_falls_and_runs_are_deterministic(flux, tmp_path):
    from benchmarks.train_reference_flux import train

    out = tmp_path / "flux.safetensors"
    report = train(seed=1, iters=20, batch=8, lr=3e-3, config=TINY, out=str(out), log_every=0, log=None)
    losses = report["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    again = train(seed=1, iters=3, batch=8, lr=3e-3, config=TINY, out=None, log_every=0, log=None)
    assert again["losses"] == train(seed=1, iters=3, batch=8, lr=3e-3, config=TINY, out=None, log_every=0,
                                     log=None)["losses"]
    patcher = flux.load_reference_flux(str(out))      # the saved file is a loadable reference model
    assert patcher.model.diffusion_model.hidden_size == 32
    assert flux.read_metadata(str(out))["report"]["iters"] == 20
