"""repa: representation-aligned diffusion transformers (SiT, REPA, REPA-E).

Sub-packages (see docs/architecture.md):
  repa.models      diffusion backbones (pure nn.Modules) and their registry
  repa.transport   flow-matching paths, objective and samplers (pure functions)
  repa.align       representation-alignment losses
  repa.encoders    frozen pretrained representation encoders
  repa.tokenizers  VAEs / pixel tokenizer and REPA-E's VAE losses
  repa.data        webdataset shards: build, stream, synthetic data
  repa.train       the training loop, per-method step maths, checkpoints, EMA
  repa.eval        sampling to .npz, metrics, FID curves
  repa.analysis    parameter and FLOP counting
"""

__version__ = "0.1.0"
