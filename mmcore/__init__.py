"""mmcore: the multimodal fusion model library (encoders, fusion, decoder, losses, metrics, data, checkpoints).

Pure PyTorch + torchvision + transformers; no training loop, cluster or tracking code.
Entry points: `mmcore.model` (FusionModelConfig, model_config, build_model), `mmcore.losses`,
`mmcore.data`, `mmcore.metrics`, `mmcore.checkpoint`.
"""
