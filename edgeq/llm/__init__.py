"""On-device decoders (issue 14): a causal LM exported with its KV cache per runtime, run step by step.

`steps.StepRunner` is the one contract every runtime's runner implements (numpy in, numpy out);
`reference.TorchStepRunner` is the FP32 PyTorch reference the others are compared against
(validate/generation.py). Heavy imports stay inside the modules that need them.
"""
