"""The FLUX components' checkpoints, one module a component (as `models/ckpt/`
is for the VLMs): flux.py (the transformer: diffusers and Black Forest Labs
names, one mapping), vae.py (the autoencoder: diffusers and BFL / LDM names),
text.py (transformers' T5 and CLIP text encoders). Each reads safetensors
through `diffusion.common` and checks keys and shapes with the `Taker` of
`models/ckpt/common.py`.
"""
