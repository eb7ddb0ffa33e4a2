"""Tiled AutoencoderKL encode/decode with shared GroupNorm statistics vs untiled."""

import pytest
import torch
import torch.nn.functional as F
from support.tiny_components import tiny_vae

from dit4sr import PixelUnshuffleAutoencoder
from dit4sr.vae_tiling import decode_latents, decoder_halo, encode_image, encoder_halo


@pytest.fixture(scope="module")
def vae():
    torch.set_num_threads(2)
    return tiny_vae()


def smooth_latent(height, width, seed=0):
    coarse = torch.randn(1, 4, height // 4, width // 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bilinear")


@pytest.mark.parametrize("tile", [16, 30])
def test_tiled_decode_matches_untiled(vae, tile):
    # Measured: max |tiled - untiled| = 2.6e-5 on outputs spanning about +-3.6 (float32 rounding only);
    # bound asserted 1e-4, i.e. far below one 8-bit level (2/255 in [-1, 1] units).
    z = smooth_latent(48, 80)
    with torch.no_grad():
        untiled = decode_latents(vae, z, "never")
        tiled = decode_latents(vae, z, "always", tile_size=tile)
    assert tiled.shape == untiled.shape == (1, 3, 384, 640)
    assert (tiled - untiled).abs().max().item() < 1e-4


def test_independent_tile_statistics_would_show(vae):
    # Contrast: diffusers' own tiling normalises each tile on its own and blends; far off the untiled result.
    z = smooth_latent(48, 80)
    with torch.no_grad():
        untiled = decode_latents(vae, z, "never")
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 128, 16, 0.25
        try:
            naive = vae.decode(z).sample
        finally:
            vae.disable_tiling()
    assert (naive - untiled).abs().max().item() > 0.1


@pytest.mark.parametrize("tile", [32, 56])
def test_tiled_encode_matches_untiled(vae, tile):
    x = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        untiled = encode_image(vae, x, "never")
        tiled = encode_image(vae, x, "always", tile_size=tile)
    assert tiled.shape == untiled.shape == (1, 4, 12, 20)
    assert (tiled - untiled).abs().max().item() < 1e-5


def test_encoding_is_the_posterior_mean(vae):
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(encode_image(vae, x, "never"), vae.encode(x).latent_dist.mean, atol=1e-6)
        assert torch.equal(encode_image(vae, x), encode_image(vae, x))


def test_auto_tiles_only_large_inputs_and_bad_mode(vae):
    z = smooth_latent(8, 8)
    with torch.no_grad():
        assert torch.equal(decode_latents(vae, z, "auto", tile_size=8), decode_latents(vae, z, "never"))
        with pytest.raises(ValueError, match="vae_tiling"):
            decode_latents(vae, z, "sometimes")


def test_halo_covers_the_receptive_field(vae):
    # SD3's VAE (4 levels, 2 layers per block): encoder radius 75 px -> 80, decoder 12.4 latents -> 14.
    assert encoder_halo(vae) % 8 == 0 and encoder_halo(vae) >= 1 + (2 + 2) + (4 + 4) + (8 + 8) + 16
    sd3 = type("Config", (), {"config": type("C", (), {"layers_per_block": 2, "block_out_channels": (1,) * 4})})
    assert (encoder_halo(sd3), decoder_halo(sd3)) == (80, 14)


def test_pixel_autoencoder_is_never_tiled():
    vae = PixelUnshuffleAutoencoder(downscale_factor=4)
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    z = encode_image(vae, x, "always")
    assert z.shape == (1, 48, 4, 6)
    assert torch.equal(decode_latents(vae, z, "always"), x)
