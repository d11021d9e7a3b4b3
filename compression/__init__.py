"""Turn a large diffusion model into an edge model: pruning, distillation, quantization, bundles."""
