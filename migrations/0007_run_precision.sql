-- What a run computed in: fp32, or bf16 autocast on a CUDA device.
ALTER TABLE runs ADD COLUMN precision text;
