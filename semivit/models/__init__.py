"""Models: ViT classifiers of timm and the small ViTs of this project, their weight files and class
lists (``classifier``); the masked autoencoder of stage 0 (``mae``)."""
