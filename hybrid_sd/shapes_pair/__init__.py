"""The shapes pair's tool chain: its architectures, training, evaluation (a switch-step sweep scored by
``hybrid_sd.shapes``) and model card, and the training of the feature net its Fréchet distance uses.

Imports run one way: ``hybrid_sd.shapes_pair`` -> ``hybrid_sd.sweep`` -> ``hybrid_sd.shapes``; the trained
pair and the feature net's weights are data of ``hybrid_sd.shapes`` (``pair/``, ``weights/``)."""
