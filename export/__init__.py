"""Training side of cmn-edge: the CMN model in PyTorch, training, ONNX export, quantization."""
