"""The parts of `examples/pretrain.py`: command line and its checks (`cli`), data and tokenizer
(`data`), the process launcher (`launch`), progress, logs and the loss curve (`progress`), and the
training run on each rank (`train`)."""
