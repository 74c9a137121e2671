"""Training: latent diffusion (:mod:`.diffusion`) and the autoencoder (:mod:`.vae_trainer`).

Shared pieces usable by both trainers: :mod:`.sharding` (mesh, FSDP rules, host-local ->
global batches), :mod:`.checkpoint` (orbax manager with data state and preemption handling),
:mod:`.optim` (AdamW + warm-up + clipping, EMA), :mod:`.writers` (TensorBoard scalars and images, progress bar).
Submodules are imported lazily so ``import ldm_jax.train`` stays cheap.
"""
