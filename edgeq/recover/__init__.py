"""Recovery after compression: distillation from the FP32 teacher, QAT on the plan's grid, LoRA over a quantized base."""
