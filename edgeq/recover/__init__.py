"""Recovery after compression: distillation from the FP32 teacher, QAT on the plan's grid, LoRA over a quantized base.

  distill.py     distill(student, teacher, spec, calibration, input_names, output_names, labels=None) -> StageResult
  qat.py         qat(student, teacher, plan, spec, ...) -> (module, QuantPlan, StageResult): fake quantization on the
                 plan's grid (fake_quant.py: straight-through rounding, LSQ scales), codes and scales written back
  lora.py        lora(student, teacher, plan, spec, ...) -> (module, QuantPlan | None, StageResult): adapters over the
                 frozen quantized base, merged and re-quantized on the plan's grid
  train.py       the loop they share (AdamW, deterministic batches and schedule, progress bar, sparsity kept)
  losses.py      response losses per output kind (KL at a temperature, cosine, relative MSE) and feature taps
  checkpoint.py  resumable checkpoints: safetensors + JSON, never pickles
"""
