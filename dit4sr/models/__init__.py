from .pixel_autoencoder import PixelUnshuffleAutoencoder
from .transformer_dit4sr import DiT4SRTransformer2DModel, DiT4SRTransformerOutput

__all__ = ["DiT4SRTransformer2DModel", "DiT4SRTransformerOutput", "PixelUnshuffleAutoencoder"]
