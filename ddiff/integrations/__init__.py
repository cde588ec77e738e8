"""Run other libraries' models with their decoding steps on ddiff's ops.

* :mod:`ddiff.integrations.diffusion_gemma`: transformers' ``DiffusionGemmaForBlockDiffusion``
  ``generate`` loop with the entropy-bound denoising step fused (one pass over the logits for
  the sampled token, the argmax and the entropy; sort-free acceptance; uniform renoising).
"""
