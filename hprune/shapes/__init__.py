"""ShapesBench: a real, trained small MMDiT teacher on a task whose images can be scored exactly.

- `data`: procedurally generated images of coloured shapes and the captions that state them
- `scenes`: the same scenes drawn and rendered in torch, in batches, on any device (GPU training)
- `text`: word-level tokenizer + small text encoder (SD3 conditioning inputs)
- `score`: analytic GenEval-style scorer (present / colour / shape / size / position / count)
- `sample`: pixel-space flow-matching sampler with classifier-free guidance; calibration sets
- `evaluate`: the benchmark for one transformer; `checkpoint`: loading the shipped teacher (teacher/)
- `train`: the training script (`python -m hprune.shapes.train --out DIR`)
"""
