"""The HTTP face of the gateway and the edge worker, beside gRPC: JSON and server-sent events on the same
generation as the gRPC servicers, the AUTOMATIC1111 txt2img subset, ``/metrics`` and the web page."""
