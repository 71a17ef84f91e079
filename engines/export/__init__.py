"""Export: engines written in the layouts other servers load (`triton`: a Triton model repository)."""
