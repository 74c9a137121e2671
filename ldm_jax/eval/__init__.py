"""Evaluation metrics for generated images (FID with pytorch-fid's InceptionV3, ...)."""
