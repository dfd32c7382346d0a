"""Training caster models: data, augmentation, tokenizer, RNN-T loss and the training loop.

Modules: `data` (manifests, mixing, duration-bucketed batching, samples), `augment`
(SpecAugment, speed perturbation, noise), `tokenizer` (SentencePiece training), `loss`
(RNN-T loss in plain PyTorch), `config` (TrainConfig from YAML + overrides), `loop` (the
Trainer), `evaluate` (WER/CER per chunk size and language), `state` (exact resume),
`metrics` (JSONL log and plot), `distributed` (torchrun/DDP), `export` (.nemo), `cli`.
Nothing is imported here, so `import caster` stays light.
"""
