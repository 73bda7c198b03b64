"""Image decoding, preprocessing, datasets and the synthetic shapes generator."""
