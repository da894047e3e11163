"""The generator: the class-conditional denoiser and its saved folder (``model``), schedules,
guidance and samplers (``sampling``), pixels <-> VAE latents (``codec``), the latent cache
(``latents``)."""
