"""DPT: pseudo-labels -> a class-conditional diffusion model -> a labeled synthetic set -> the
classifier retrained on real + synthetic images.

``diffusion/`` holds the generator (model and saved folder, sampling, the VAE codec, the latent
cache); the stages are ``train_diffusion``, ``generate``, ``fid``, ``retrain`` and ``probe``;
``pipeline`` runs them all with ``state`` (``pipeline.json``) and ``report``; ``cli`` is the ``dpt``
command.
"""
