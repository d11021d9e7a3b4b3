"""UNets whose modules compression.prune shrank: a standard diffusers config plus ``pruning.json``, shaped and
loaded here so that the engine and the edge worker load them without the compression tool chain."""
