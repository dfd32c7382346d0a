"""Training caster models: data, augmentation, tokenizer, RNN-T loss and the training loop.

Modules: `data` (manifests, mixing, duration-bucketed batching, samples), `augment`
(SpecAugment, speed perturbation, noise), `tokenizer` (SentencePiece training), `loss`
(RNN-T loss in plain PyTorch). Nothing is imported here, so `import caster` stays light.
"""
